"""Prompt encoding: chat template, where the user's content starts, response labels, padding.

Chat templates put the same tokens (often a default system prompt) before every user turn.
Edits at the "first" prompt positions and a router reading them would then see identical
tokens for every input, so every encoded example carries `prompt_start`: the index of the
first token of the user's content, found by rendering the template around a sentinel.
"""

from __future__ import annotations

import torch

_SENTINEL = "\ue000CSREFT_CONTENT\ue000"
PLAIN_PREFIX, PLAIN_SUFFIX = "### Instruction:\n", "\n\n### Response:\n"


def template_parts(tokenizer, system: str | None = None) -> tuple[str, str]:
    """(text before the user's content, text after it up to the response) for one turn."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": _SENTINEL})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix, _, suffix = rendered.partition(_SENTINEL)
        return prefix, suffix
    prefix = (tokenizer.bos_token or "") + (f"{system}\n\n" if system else "") + PLAIN_PREFIX
    return prefix, PLAIN_SUFFIX


def response_suffix(tokenizer) -> str:
    """What the template appends after an assistant response (end-of-turn marker)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": "x"}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        if full.startswith(prompt) and _SENTINEL in full:
            return full.partition(_SENTINEL)[2]
    return tokenizer.eos_token or ""


def encode_prompt(tokenizer, text: str, system: str | None = None, parts=None) -> tuple[list[int], int]:
    """Token ids of the templated prompt and the index of the first token of `text`.

    The prompt is tokenized as one string; if a token straddles the template/content
    boundary (content starting with a newline can merge with the template's newline), the
    template prefix and the rest are tokenized separately so that the boundary is exact.
    """
    prefix, suffix = parts or template_parts(tokenizer, system)
    enc = tokenizer(prefix + text + suffix, add_special_tokens=False, return_offsets_mapping=True)
    cut = len(prefix)
    start = next((i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= cut), len(enc["input_ids"]))
    straddles = any(a < cut < b for a, b in enc["offset_mapping"])
    if not straddles:
        return list(enc["input_ids"]), start
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    tail = tokenizer(text + suffix, add_special_tokens=False)["input_ids"]
    return list(head) + list(tail), len(head)


def encode_example(tokenizer, prompt: str, response: str | None = None, system: str | None = None,
                   parts=None, suffix: str | None = None) -> dict:
    """{"input_ids", "labels" (-100 on the prompt), "prompt_start", "prompt_length"}."""
    ids, start = encode_prompt(tokenizer, prompt, system, parts)
    out = {"input_ids": ids, "prompt_start": start, "prompt_length": len(ids)}
    if response is not None:
        end = response_suffix(tokenizer) if suffix is None else suffix
        resp = tokenizer(response + end, add_special_tokens=False)["input_ids"]
        out["input_ids"] = ids + list(resp)
        out["labels"] = [-100] * len(ids) + list(resp)
    return out


def pad_batch(examples: list[dict], pad_id: int, side: str = "right") -> dict:
    """Pad encoded examples into tensors: input_ids, attention_mask, [labels], prompt_starts,
    prompt_lengths (both relative to each unpadded row, as CSReftModel expects)."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(seq, value):
        fill = [value] * (width - len(seq))
        return fill + list(seq) if side == "left" else list(seq) + fill

    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
        "prompt_starts": torch.tensor([e["prompt_start"] for e in examples]),
        "prompt_lengths": torch.tensor([e["prompt_length"] for e in examples]),
    }
    if all("labels" in e for e in examples):
        batch["labels"] = torch.tensor([pad(e["labels"], -100) for e in examples])
    return batch
