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
    for name, value in (("prompt", prompt), ("response", response), ("system", system)):
        if not (isinstance(value, str) or (value is None and name != "prompt")):
            raise ValueError(f"encode_example: {name} must be a string, got {type(value).__name__}")
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
    if not examples:
        raise ValueError("pad_batch: no examples to pad (an empty list)")
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side={side!r} is not valid: left or right")
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


# -- data files ----------------------------------------------------------------------------------
class DataError(ValueError):
    """A data file or record is unusable; the message names the file, record and field."""


def load_records(source: str, split: str = "train") -> list[dict]:
    """Read a JSON list / JSONL file (or, online, a Hugging Face dataset name) into records
    {"prompt", "response", "skill" (or None), "system" (or None)}.

    Accepted record formats: alpaca (instruction, optional input, output), prompt/response,
    and chat (messages: [system?], user, assistant). An optional string field `skill` names
    the record's skill.
    """
    from pathlib import Path

    path = Path(source)
    where = None
    if path.is_file():
        lines: list[int] = []
        raw = _read_json_records(path, lines)
        where = [f"line {n}" for n in lines] or None  # a JSONL file's records are named by line
    elif path.exists() or path.suffix in (".json", ".jsonl"):
        raise DataError(f"{source}: not a readable JSON or JSONL file")
    else:
        try:
            import datasets

            raw = [dict(r) for r in datasets.load_dataset(source, split=split)]
        except Exception as err:  # offline, unknown name, ...
            raise DataError(f"{source}: no such file, and not loadable as a Hugging Face dataset ({err})") from err
    if not raw:
        raise DataError(f"{source}: contains no records")
    return [normalize_record(r, source, i + 1, where and where[i]) for i, r in enumerate(raw)]


def load_prompts(path) -> list[dict]:
    """Prompts of a JSON / JSONL file, each with the `skill` it belongs to (responses are not
    needed and not read): {"prompt", "skill", "system"}. Calibration data of a skill library."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines: list[int] = []
    raw = _read_json_records(path, lines)
    out = []
    for i, r in enumerate(raw):
        place = f"line {lines[i]}" if lines else None
        if isinstance(r, dict):  # the prompt formats with a placeholder response, which is dropped
            r = {**r, **({"response": "-"} if "prompt" in r else {"output": "-"} if "instruction" in r else {})}
            if "messages" in r and isinstance(r["messages"], list) and r["messages"][-1:] and \
                    isinstance(r["messages"][-1], dict) and r["messages"][-1].get("role") == "user":
                r["messages"] = [*r["messages"], {"role": "assistant", "content": "-"}]
        rec = normalize_record(r, str(path), i + 1, place)
        if not rec["skill"]:
            raise DataError(f"{path}: {place or f'record {i + 1}'}: field 'skill' is missing: every calibration "
                            "prompt names the library skill it is a prompt of")
        out.append({"prompt": rec["prompt"], "skill": rec["skill"], "system": rec["system"]})
    if not out:
        raise DataError(f"{path}: contains no prompts")
    return out


def read_text(path) -> str:
    """A text file's contents; a file that is not UTF-8 is a DataError naming it."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None


def _read_json_records(path, lines: list | None = None) -> list:
    """The records of a JSON or JSONL file; a JSONL file's line numbers are added to `lines`."""
    import json

    text = read_text(path)
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                    if lines is not None:
                        lines.append(line_no)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {line_no}: invalid JSON ({err.msg})") from err
                except RecursionError:
                    raise DataError(f"{path}: line {line_no}: JSON nested too deeply") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data" and _one_object_per_line(text):
            hint = "; it looks like JSON Lines (one record per line): name it .jsonl"
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}){hint}") from err
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    return data


def _one_object_per_line(text: str) -> bool:
    import json

    lines = [line for line in text.splitlines() if line.strip()][:3]
    try:
        return len(lines) > 1 and all(isinstance(json.loads(line), dict) for line in lines)
    except ValueError:
        return False


# fields of one record format that another format would ignore
_FORMAT_FIELDS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "prompt/response": ("prompt", "response")}


def normalize_record(record, source: str, number: int, place: str | None = None) -> dict:
    """One raw record -> {"prompt", "response", "skill", "system"}; `number` counts from 1,
    `place` (e.g. "line 4" in a JSONL file) says where it is instead."""
    where = f"{source}: {place or f'record {number}'}"

    def field(name, required=True, allow_empty=False):
        if name not in record:
            if required:
                raise DataError(f"{where}: field {name!r} is missing (record fields: {sorted(record)})")
            return None
        value = record[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise DataError(f"{where}: field {name!r} is empty")
        _unicode(value, where, name)
        return value

    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    formats = [name for name, keys in _FORMAT_FIELDS.items() if any(k in record for k in keys)]
    if len(formats) > 1:
        raise DataError(f"{where}: fields of two record formats ({' and '.join(formats)}: {sorted(record)}); "
                        "give one, so that it is clear which is the prompt")
    system = None
    if "messages" in record:
        prompt, response, system = _chat_turn(record["messages"], where)
    elif "instruction" in record:
        prompt = field("instruction")
        extra = field("input", required=False, allow_empty=True)
        prompt = f"{prompt}\n\n{extra}" if extra and extra.strip() else prompt
        response = field("output")
    elif "prompt" in record:
        prompt, response = field("prompt"), field("response")
    else:
        raise DataError(
            f"{where}: unknown record format (fields {sorted(record)}); expected alpaca "
            "(instruction, input, output), prompt/response, or chat (messages)"
        )
    out = {"prompt": prompt, "response": response, "skill": field("skill", required=False), "system": system}
    if "skills" in record:  # every skill the record needs (a composed one: several)
        skills = record["skills"]
        if not isinstance(skills, list) or not skills or not all(isinstance(x, str) and x.strip() for x in skills):
            raise DataError(f"{where}: field 'skills' must be a non-empty list of skill names, got {skills!r}")
        if out["skill"] is not None and out["skill"] not in skills:
            raise DataError(f"{where}: field 'skill' {out['skill']!r} is not among its 'skills' {skills}")
        out["skills"] = list(skills)
    if "answer" in record:  # what a checker compares against (else the whole response)
        out["answer"] = field("answer")
    if "choices" in record:  # candidate responses for label log-likelihood scoring
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of at least two strings")
        for c in choices:
            _unicode(c, where, "choices")
        if response not in choices:
            raise DataError(f"{where}: field 'choices' must contain the response {response!r}")
        out["choices"] = choices
    return out


def _unicode(value: str, where: str, name: str) -> None:
    """Refuse text no tokenizer can encode (lone surrogates from \\ud800-style escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: field {name!r} is not valid Unicode ({err.reason} at character {err.start})") from None


def _chat_turn(messages, where: str) -> tuple[str, str, str | None]:
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages] if isinstance(messages, list) else None
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise DataError(
            f"{where}: field 'messages' must be [system (optional), user, assistant] with "
            f"role/content entries; got roles {roles}"
        )
    contents = [m.get("content") for m in messages]
    for role, content in zip(roles, contents):
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: field 'messages' has an empty or non-string {role} content")
        _unicode(content, where, "messages")
    return contents[-2], contents[-1], contents[0] if len(contents) == 3 else None


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized records for training: labels only on response tokens.

    Truncation policy for `max_length`: the prompt is kept whole and the response is cut at
    its end; a record whose prompt alone leaves no room for a response token is dropped.
    `truncated` and `dropped` count both cases. `skills` maps skill names to subspace indices
    (records without a skill get -1).
    """

    def __init__(self, records: list[dict], tokenizer, max_length: int = 512, skills: list[str] | None = None):
        index = {name: i for i, name in enumerate(skills or [])}
        suffix, parts = response_suffix(tokenizer), {}
        self.examples, self.truncated, self.dropped = [], 0, 0
        for rec in records:
            system = rec.get("system")
            if system not in parts:
                parts[system] = template_parts(tokenizer, system)
            e = encode_example(tokenizer, rec["prompt"], rec["response"], parts=parts[system], suffix=suffix)
            if len(e["input_ids"]) > max_length:
                if e["prompt_length"] >= max_length:
                    self.dropped += 1
                    continue
                self.truncated += 1
                e["input_ids"], e["labels"] = e["input_ids"][:max_length], e["labels"][:max_length]
            e["skill_set"] = sorted({index[x] for x in rec.get("skills") or [rec.get("skill")] if x in index})
            e["skill_label"] = index.get(rec.get("skill"), e["skill_set"][0] if len(e["skill_set"]) == 1 else -1)
            if isinstance(rec.get("answer"), str) and rec["answer"] and rec["answer"] in rec["response"]:
                e["answer_mask"] = _answer_mask(tokenizer, rec, suffix, e["prompt_length"], len(e["input_ids"]))
            self.examples.append(e)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def _answer_mask(tokenizer, record: dict, suffix: str, prompt_length: int, length: int) -> list[int]:
    """1 on the response tokens that spell record["answer"] (its last occurrence), else 0."""
    enc = tokenizer(record["response"] + suffix, add_special_tokens=False, return_offsets_mapping=True)
    a = record["response"].rfind(record["answer"])
    b = a + len(record["answer"])
    mask = [0] * prompt_length + [int(x < b and y > a) for x, y in enc["offset_mapping"]]
    return mask[:length]


def skill_names(records: list[dict]) -> list[str]:
    """Sorted distinct skill names of the records' 'skill' and 'skills' (subspace i <-> skills[i])."""
    return sorted({r["skill"] for r in records if r.get("skill")} | {x for r in records for x in r.get("skills") or []})


class Collator:
    """Right-pads examples for training; adds answer_mask (B, L) when every example marks its
    answer tokens, and one of
      skill_labels (B,), or (B, k) 0/1 when a record has several skills (`with_skills`: the
                   supervised routing loss);
      gates (B, k) (`gates_from_skills`, k given): 1 on each record's skills, 0 elsewhere, and
                   with `dropin` > 0 each other subspace, with that chance, at a factor drawn
                   from `factors` (the target unchanged: composable training);
      skill_ids (B,) otherwise (logged routing statistics only).
    Drop-ins come from a generator seeded by `seed`, the process rank and the DataLoader worker
    (a resumed run draws them afresh)."""

    def __init__(self, pad_id: int, with_skills: bool = False, gates_from_skills: bool = False, k: int | None = None,
                 dropin: float = 0.0, factors=(-1.0, 1.0), seed: int = 0):
        if gates_from_skills and (with_skills or k is None):
            raise ValueError("gates_from_skills needs k and excludes with_skills (explicit gates train no router)")
        self.pad_id, self.with_skills, self.gates_from_skills, self.k = pad_id, with_skills, gates_from_skills, k
        self.dropin, self.factors = float(dropin), torch.tensor([float(f) for f in factors])
        self.seed, self._generator = seed, None

    def _draws(self) -> torch.Generator:
        """The drop-in generator of this process and DataLoader worker (created at first use)."""
        if self._generator is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            worker = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + 1009 * rank + (worker.id + 1 if worker else 0))
        return self._generator

    def _multi_hot(self, examples: list[dict], k: int) -> torch.Tensor:
        hot = torch.zeros(len(examples), k)
        for i, e in enumerate(examples):
            hot[i, e["skill_set"]] = 1.0
        return hot

    def __call__(self, examples: list[dict]) -> dict:
        batch = pad_batch(examples, self.pad_id, side="right")
        if all("answer_mask" in e for e in examples):
            width = batch["input_ids"].shape[1]
            batch["answer_mask"] = torch.tensor([e["answer_mask"] + [0] * (width - len(e["answer_mask"])) for e in examples])
        several = any(len(e.get("skill_set", ())) > 1 for e in examples)
        if self.gates_from_skills:
            gates = self._multi_hot(examples, self.k)
            if self.dropin > 0:
                on = (torch.rand(gates.shape, generator=self._draws()) < self.dropin) & (gates == 0)
                pick = torch.randint(len(self.factors), gates.shape, generator=self._draws())
                gates = torch.where(on, self.factors[pick], gates)
            batch["gates"] = gates
            batch["skill_ids"] = torch.tensor([e["skill_label"] for e in examples])
        elif self.with_skills and several:
            if self.k is None:
                raise ValueError("records with several skills need the Collator's k (the number of subspaces)")
            hot = self._multi_hot(examples, self.k)
            hot[[not e["skill_set"] for e in examples]] = -1.0  # unlabelled rows
            batch["skill_labels"] = hot
            batch["skill_ids"] = torch.tensor([e["skill_label"] for e in examples])  # statistics
        elif self.with_skills:
            batch["skill_labels"] = torch.tensor([e["skill_label"] for e in examples])
        elif all("skill_label" in e for e in examples):  # for the routing statistics only
            batch["skill_ids"] = torch.tensor([e["skill_label"] for e in examples])
        return batch
