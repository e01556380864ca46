"""Scoring on evaluation suites: label log-likelihood (one forward per example), greedy exact
match and held-out response NLL (paired tests between two methods: stats.py).

Every function takes a CSReftModel (edits on the prompt, counted from the user's content) or a
plain transformers causal LM, and encodes records with csreft.data.encode_example, so scoring
sees exactly the tokens training sees (chat template, response + end-of-turn marker).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check_batch_size
from ..data import SupervisedDataset, encode_example, response_suffix, template_parts
from ..generation import generate_texts
from ..model import CSReftModel

# attention implementations that honour a custom 4D mask (needed to pack candidates)
_PACKABLE = ("eager", "sdpa")


@dataclass
class _Row:
    """One sequence to run. block[i]: -1 prompt / shared response prefix, j >= 0 candidate j's
    own tokens. entries: (position whose logits predict the token, token, example, candidate),
    candidate -1 meaning "counts for every candidate of the example"."""

    ids: list[int]
    start: int
    length: int
    block: list[int]
    positions: list[int] | None = None
    entries: list[tuple[int, int, int, int]] = field(default_factory=list)


def _pad_id(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if pad is not None:
            return pad
    return 0


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _encode_choices(tokenizer, record: dict, parts, suffix) -> tuple[list[int], int, list[list[int]]]:
    """(prompt ids, prompt start, response ids of each choice) as encode_example makes them."""
    encoded = [encode_example(tokenizer, record["prompt"], c, parts=parts, suffix=suffix)
               for c in record["choices"]]
    p = encoded[0]["prompt_length"]
    prompt = encoded[0]["input_ids"][:p]
    assert all(e["input_ids"][:p] == prompt for e in encoded), "choices changed the prompt's tokens"
    return prompt, encoded[0]["prompt_start"], [e["input_ids"][p:] for e in encoded]


def _packed_row(prompt: list[int], start: int, responses: list[list[int]], example: int) -> _Row:
    """prompt + shared response prefix + each candidate's remaining tokens, in one row.

    Candidate j's tokens sit at positions S.. (S = shared length), as if alone after the shared
    part; the tree mask (_tree_mask) lets them see the shared part and themselves only.
    """
    c = max(0, min(_common_prefix(responses), min(len(r) for r in responses) - 1))
    shared = prompt + responses[0][:c]
    p, s = len(prompt), len(shared)
    row = _Row(list(shared), start, p, [-1] * s, list(range(s)))
    row.entries = [(p - 1 + t, responses[0][t], example, -1) for t in range(c)]
    for j, resp in enumerate(responses):
        offset, tail = len(row.ids), resp[c:]
        row.entries += [(s - 1 if t == 0 else offset + t - 1, tok, example, j) for t, tok in enumerate(tail)]
        row.ids += tail
        row.positions += range(s, s + len(tail))
        row.block += [j] * len(tail)
    return row


def _plain_row(prompt: list[int], start: int, response: list[int], example: int, cand: int) -> _Row:
    """prompt + one response: an ordinary causal row."""
    p = len(prompt)
    entries = [(p - 1 + t, tok, example, cand) for t, tok in enumerate(response)]
    return _Row(prompt + response, start, p, [-1] * (p + len(response)), None, entries)


def _tree_mask(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) block ids -> additive (B, 1, L, L) mask. Query i sees key k <= i when k is in
    the shared part (block -1) or in i's own block; padding (block -2) sees only itself."""
    length = block.shape[1]
    q, k = block[:, :, None], block[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=block.device).tril()
    allowed = causal & ((k == -1) | (k == q)) & (q != -2) & (k != -2)
    allowed |= torch.eye(length, dtype=torch.bool, device=block.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=block.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _head_logits(model, input_ids, attention_mask, at, prompt_starts, prompt_lengths, position_ids=None):
    """Logits (N, V) at the True positions of `at` (B, L), row-major; the LM head runs only there.

    A plain model runs as decoder + output embeddings, so post-head transforms some families
    apply in their own forward (logit soft-capping, logit scaling) are not applied.
    """
    common = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if isinstance(model, CSReftModel):
        return model(**common, prompt_starts=prompt_starts, prompt_lengths=prompt_lengths, logits_at=at).logits
    hidden = model.get_decoder()(**common).last_hidden_state
    return model.get_output_embeddings()(hidden[at.to(hidden.device)])


def _packable(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) in _PACKABLE


@torch.no_grad()
def _entry_logprobs(model, rows: list[_Row], pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """log p(token) of every entry of every row (rows with .positions use the tree mask)."""
    check_batch_size(batch_size)
    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    for i in tqdm(range(0, len(order), batch_size), desc="scoring", leave=False, disable=None):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        width = max(len(r.ids) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        at = torch.zeros(len(chunk), width, dtype=torch.bool)
        block = torch.full((len(chunk), width), -2, dtype=torch.long)
        positions = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, :len(r.ids)] = torch.tensor(r.ids)
            block[b, :len(r.ids)] = torch.tensor(r.block)
            positions[b, :len(r.ids)] = torch.tensor(r.positions if r.positions is not None else range(len(r.ids)))
            at[b, [e[0] for e in r.entries]] = True
        if all(r.positions is not None for r in chunk):
            mask, pos = _tree_mask(block, dtype).to(device), positions.to(device)
        else:
            mask, pos = (block != -2).long().to(device), None
        logits = _head_logits(model, ids.to(device), mask, at.to(device),
                              [r.start for r in chunk], [r.length for r in chunk], pos)
        rank = (at.flatten().cumsum(0) - 1).view(at.shape)
        for b, (j, r) in enumerate(zip(order[i:i + batch_size], chunk)):
            if not r.entries:
                out[j] = torch.zeros(0)
                continue
            where = rank[b, [e[0] for e in r.entries]].to(logits.device)
            targets = torch.tensor([e[1] for e in r.entries], device=logits.device)
            out[j] = -F.cross_entropy(logits[where].float(), targets, reduction="none").cpu()
    return out


def candidate_logprobs(model, tokenizer, records: list[dict], batch_size: int = 8,
                       system: str | None = None, packed: bool | None = None) -> list[list[float]]:
    """log p(choice_j | prompt) for every record and choice: the SUM of the log-probs of the
    choice's response tokens, end-of-turn marker included (no length normalisation).

    packed (default: when the attention implementation honours 4D masks, eager or sdpa): one
    row per example, the prompt and the choices' shared response prefix run once and each
    choice's remaining tokens follow under a tree mask with their own position ids, so a
    k-choice example costs one forward of about its single-answer length. packed=False: one
    ordinary row per choice (k times the work; the reference implementation). The LM head runs
    only at the positions that predict response tokens.
    """
    parts, suffix = template_parts(tokenizer, system), response_suffix(tokenizer)
    packed = _packable(model) if packed is None else packed
    rows, sizes = [], []
    for n, record in enumerate(records):
        if not record.get("choices"):
            raise ValueError(f"record {n} (skill {record.get('skill')!r}) has no 'choices' to score")
        prompt, start, responses = _encode_choices(tokenizer, record, parts, suffix)
        sizes.append(len(responses))
        if packed:
            rows.append(_packed_row(prompt, start, responses, n))
        else:
            rows += [_plain_row(prompt, start, resp, n, j) for j, resp in enumerate(responses)]
    scores = [[0.0] * k for k in sizes]
    for row, logprobs in zip(rows, _entry_logprobs(model, rows, _pad_id(tokenizer), batch_size)):
        for (_, _, n, j), lp in zip(row.entries, logprobs.tolist()):
            for cand in (range(sizes[n]) if j < 0 else (j,)):
                scores[n][cand] += lp
    return scores


def score_choices(model, tokenizer, records: list[dict], batch_size: int = 8,
                  system: str | None = None, packed: bool | None = None) -> list[int]:
    """Index of the chosen candidate per record: argmax over choices of the summed response
    log-probs (see candidate_logprobs). Ties go to the lowest index (the first listed)."""
    scores = candidate_logprobs(model, tokenizer, records, batch_size, system, packed)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def response_nll(model, tokenizer, records: list[dict], batch_size: int = 8, system: str | None = None,
                 max_length: int | None = None) -> dict:
    """Mean negative log-likelihood per response token (end-of-turn marker included), weighted
    by tokens: {"nll", "perplexity", "tokens", "examples", "truncated", "dropped", "max_length"}.

    Records may carry their own "system" (else `system`). With max_length, records are cut as
    in training (SupervisedDataset: the prompt is kept, the response cut; a record whose
    prompt fills max_length is dropped and counted).
    """
    if system is not None:
        records = [{**r, "system": r.get("system", system)} for r in records]
    data = SupervisedDataset(records, tokenizer, max_length or 1 << 30)
    rows = []
    for n, e in enumerate(data.examples):
        p = e["prompt_length"]
        rows.append(_plain_row(e["input_ids"][:p], e["prompt_start"], e["input_ids"][p:], n, 0))
    logprobs = _entry_logprobs(model, rows, _pad_id(tokenizer), batch_size)
    count = sum(len(lp) for lp in logprobs)
    if count == 0:
        raise ValueError("no response tokens to score")
    nll = -float(sum(lp.double().sum() for lp in logprobs)) / count
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": count, "examples": len(rows),
            "truncated": data.truncated, "dropped": data.dropped, "max_length": max_length}


def exact_match_accuracy(model, tokenizer, records: list[dict], check, batch_size: int = 8,
                         max_new_tokens: int | None = None, system: str | None = None) -> dict:
    """Greedy generation + check(record, output) -> {"accuracy", "correct", "outputs"}.

    max_new_tokens defaults to the longest reference response's token count + 8: a longer
    output cannot pass any checker, so generating further only costs time.
    """
    if not records:
        raise ValueError("no records to evaluate")
    if max_new_tokens is None:
        longest = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records)
        max_new_tokens = longest + 8
    outputs = generate_texts(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                             system=system, batch_size=batch_size)
    correct = [bool(check(r, o)) for r, o in zip(records, outputs)]
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "outputs": outputs}


def evaluate_suite(model, tokenizer, suite, split: str = "test", method: str | None = None,
                   batch_size: int = 8, records: list[dict] | None = None, with_nll: bool = False,
                   max_new_tokens: int | None = None, system: str | None = None) -> dict:
    """Score `suite` (its `split`, or the given records) with `method`: "label" (log-likelihood
    choice among record["choices"]) or "exact" (greedy generation + suite.check); default from
    suite.scoring.

    Returns {"suite", "split", "method", "n", "accuracy" (unweighted mean of the per-skill
    accuracies), "micro_accuracy" (over all records), "per_skill": {skill: {"n", "correct",
    "accuracy"}}, "correct" (per record, in record order: for paired tests), "predictions"
    (chosen choice or generated text), "skills", "seconds" (wall time), ["response_nll"]}.
    """
    records = suite.split(split) if records is None else records
    method = method or ("label" if suite.scoring == "label" else "exact")
    if not records:
        raise ValueError(f"suite {suite.name!r} has no {split!r} records")
    t0 = time.perf_counter()
    if method == "label":
        chosen = score_choices(model, tokenizer, records, batch_size, system)
        predictions = [r["choices"][i] for r, i in zip(records, chosen)]
        correct = [suite.check(r, p) for r, p in zip(records, predictions)]
    elif method == "exact":
        result = exact_match_accuracy(model, tokenizer, records, suite.check, batch_size, max_new_tokens, system)
        predictions, correct = result["outputs"], result["correct"]
    else:
        raise ValueError(f"unknown method {method!r}; expected 'label' or 'exact'")
    skills = [r["skill"] for r in records]
    names = [s for s in suite.skills if s in skills] + list(dict.fromkeys(s for s in skills if s not in suite.skills))
    per_skill = {}
    for name in names:
        hits = [c for c, s in zip(correct, skills) if s == name]
        per_skill[name] = {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)}
    out = {
        "suite": suite.name, "split": split, "method": method, "n": len(records),
        "accuracy": sum(v["accuracy"] for v in per_skill.values()) / len(per_skill),
        "micro_accuracy": sum(correct) / len(correct),
        "per_skill": per_skill, "correct": correct, "predictions": predictions, "skills": skills,
    }
    if with_nll:
        out["response_nll"] = response_nll(model, tokenizer, records, batch_size, system)["nll"]
    out["seconds"] = time.perf_counter() - t0
    return out


# -- paired tests between two methods on the same records -------------------------------------
