"""Batched text generation from plain prompts, with or without an adapter."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .checks import check_batch_size
from .data import encode_example, pad_batch, template_parts
from .gates import resolve_gates
from .model import CSReftModel


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                   system: str | None = None, batch_size: int = 8, gates=None, skills=None,
                   **generate_kwargs) -> list[str]:
    """Greedy (by default) completions for `prompts`, left-padded in batches.

    `model` is a CSReftModel (edits on the prompt, counted from the user's content) or any
    transformers causal LM. gates / skills (CSReftModel only, see csreft.gates): one per
    prompt, or one for all of them.
    """
    check_batch_size(batch_size)
    if gates is not None or skills is not None:
        if not isinstance(model, CSReftModel):
            raise ValueError("gates and skills need a CSReftModel (an adapter)")
        gates = resolve_gates(gates, skills, model.skill_names, model.csreft_config.num_subspaces, len(prompts),
                              len(model.csreft_config.layers))
    parts = template_parts(tokenizer, system)
    encoded = [encode_example(tokenizer, p, parts=parts) for p in prompts]
    generate_kwargs.setdefault("do_sample", False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts = []
    for i in tqdm(range(0, len(encoded), batch_size), desc="generating", leave=False, disable=None):
        batch = pad_batch(encoded[i:i + batch_size], pad_id, side="left")
        kwargs = dict(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device),
                      max_new_tokens=max_new_tokens, pad_token_id=pad_id, **generate_kwargs)
        if isinstance(model, CSReftModel):
            kwargs["prompt_starts"] = batch["prompt_starts"]
            if gates is not None:
                kwargs["gates"] = gates[i:i + batch_size]
        with torch.no_grad():
            out = model.generate(**kwargs)
        width = batch["input_ids"].shape[1]
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]
