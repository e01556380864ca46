"""Instruction-tuning evaluation: AlpacaEval-style outputs, a local pairwise judge, response NLL.

- `generate_outputs`: a model's outputs for an instruction file in AlpacaEval's model-outputs
  format (JSON list of {"instruction", "output", "generator", "dataset"}), written batch by
  batch so that an interrupted run resumes where it stopped;
- `judge_pairwise`: a local chat model compares two systems' outputs, in both orders, by the
  probability it gives to answering "A" or "B"; win rate with its standard error;
- `split_alpaca_eval`, `ultrafeedback_best`: data preparation for the recipes in configs/.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from ..data import DataError, _read_json_records, encode_prompt, pad_batch, template_parts
from .suites import data_dir_candidates

ALPACA_EVAL_FILE = "alpaca_eval/alpaca_eval_v1_text_davinci_003.json"
ALPACA_EVAL_HUB = "tatsu-lab/alpaca_eval"  # its alpaca_eval.json holds the same 805 records


# -- instruction files ---------------------------------------------------------------------------
def data_root() -> Path:
    """The data folder that holds the AlpacaEval file (looked for as the suites look for theirs:
    $CSREFT_DATA, else ../shared/data), else the first place looked."""
    looked = data_dir_candidates()
    return next((root for root in looked if (root / ALPACA_EVAL_FILE).is_file()), looked[0])


def default_instructions() -> str:
    """The local AlpacaEval v1 file when present, else the Hub dataset's name."""
    path = data_root() / ALPACA_EVAL_FILE
    return str(path) if path.is_file() else ALPACA_EVAL_HUB


def load_instructions(source: str | None = None, offset: int = 0, limit: int | None = None) -> list[dict]:
    """Records {"index", "instruction", "prompt", "dataset", "output"} from an instruction file.

    `source`: a JSON list / JSONL file of AlpacaEval records (instruction [, input], output,
    dataset), prompt/response records, or the Hub name tatsu-lab/alpaca_eval (needs network).
    `index` is the position in the whole file; `offset`/`limit` select a slice. `output` is
    the record's reference output (None when absent).
    """
    source = source or default_instructions()
    path = Path(source)
    if path.is_file():
        raw = _read_json_records(path)
    elif source == ALPACA_EVAL_HUB:
        from huggingface_hub import hf_hub_download

        raw = json.loads(Path(hf_hub_download(source, "alpaca_eval.json", repo_type="dataset")).read_text())
    else:
        raise DataError(f"{source}: no such instruction file")
    records = []
    for i, r in enumerate(raw):
        text = r.get("instruction", r.get("prompt")) if isinstance(r, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}: record {i + 1}: needs a non-empty 'instruction' (or 'prompt')")
        extra = r.get("input") or ""
        records.append({
            "index": i, "instruction": text,
            "prompt": f"{text}\n\n{extra}" if extra.strip() else text,
            "dataset": r.get("dataset", "custom"), "output": r.get("output", r.get("response")),
        })
    return records[offset: None if limit is None else offset + limit]


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# -- generation ----------------------------------------------------------------------------------
def sidecar_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """(progress JSONL, settings JSON) kept next to OUTPUT.json."""
    out = Path(output)
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(stem + ".progress.jsonl"), out.with_name(stem + ".meta.json")


def _read_progress(path: Path) -> dict[int, dict]:
    """Rows already generated, by index; a line cut short by an interruption is dropped."""
    rows = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("index"), int):
                rows[row["index"]] = row
    return rows


def generate_outputs(model, tokenizer, records: list[dict], output: str | os.PathLike, generator: str,
                     batch_size: int = 8, max_new_tokens: int = 512, system: str | None = None,
                     settings: dict | None = None, overwrite: bool = False, seed: int = 0,
                     log=print, **generate_kwargs) -> list[dict]:
    """Generate outputs for `records` (from load_instructions) into OUTPUT (AlpacaEval format).

    Each finished batch is appended to OUTPUT's .progress.jsonl sidecar (flushed to disk) and
    OUTPUT is rewritten atomically, so OUTPUT always holds every selected instruction done so
    far, in input order. A rerun with the same settings (model, adapter, instruction file,
    decoding) skips what is done, also when it selects a wider slice; other settings raise
    ValueError unless `overwrite`. Settings, progress and wall time go to .meta.json.
    """
    from ..generation import generate_texts

    output = Path(output)
    progress, meta_path = sidecar_paths(output)
    decoding = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "system": system,
                "do_sample": False, "seed": seed, **generate_kwargs}
    meta = {"generator": generator, **(settings or {}), "decoding": decoding}
    if overwrite:
        for p in (progress, meta_path, output):
            p.unlink(missing_ok=True)
    old = json.loads(meta_path.read_text()) if progress.exists() and meta_path.exists() else {}
    changed = sorted(k for k in meta if old and old.get(k) != meta[k])
    if changed:
        raise ValueError(f"{output}: an earlier run used other settings ({', '.join(changed)}); "
                         "pass overwrite=True (--overwrite) to start again")
    rows = _read_progress(progress)
    progress.parent.mkdir(parents=True, exist_ok=True)
    # keep only complete lines, so that appends never follow a torn one
    tmp = progress.with_name(progress.name + ".tmp")
    tmp.write_text("".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in sorted(rows)), encoding="utf-8")
    os.replace(tmp, progress)
    done = {r["index"]: rows[r["index"]] for r in records
            if rows.get(r["index"], {}).get("instruction") == r["instruction"]}
    todo = [r for r in records if r["index"] not in done]
    if done:
        log(f"{output}: resuming, {len(done)} of {len(records)} already done")
    started, wall_before = time.time(), old.get("wall_seconds", 0.0)

    def write_outputs() -> list[dict]:
        out = [{k: done[r["index"]][k] for k in ("instruction", "output", "generator", "dataset")}
               for r in records if r["index"] in done]
        _write_json_atomic(output, out)
        _write_json_atomic(meta_path, {**meta, "selected": len(records), "done": len(out),
                                       "complete": len(out) == len(records),
                                       "wall_seconds": round(wall_before + time.time() - started, 1)})
        return out

    out = write_outputs()
    for start in range(0, len(todo), batch_size):
        batch = todo[start: start + batch_size]
        torch.manual_seed(seed + batch[0]["index"])  # sampling does not depend on where a run resumed
        texts = generate_texts(model, tokenizer, [r["prompt"] for r in batch], max_new_tokens=max_new_tokens,
                               system=system, batch_size=len(batch), **generate_kwargs)
        with progress.open("a", encoding="utf-8") as f:
            for r, text in zip(batch, texts):
                done[r["index"]] = {"index": r["index"], "instruction": r["instruction"], "output": text,
                                    "generator": generator, "dataset": r["dataset"]}
                f.write(json.dumps(done[r["index"]], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        out = write_outputs()
        log(f"{output}: {len(out)}/{len(records)} done ({time.time() - started:.0f} s)")
    return out


# -- pairwise judge ------------------------------------------------------------------------------
# Measured on SmolLM2-135M-Instruct as the judge, this wording with the answer prefix separated
# a correct answer from garbled ones in every case tried (longer instructions did not).
JUDGE_PROMPT = (
    "Instruction: {instruction}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
    "Which is the better answer to the instruction: Response A or Response B?"
)
JUDGE_ANSWER_PREFIX = "The better answer is Response"  # opens the judge's answer; the next token is scored


def _letter_ids(tokenizer, letter: str) -> list[int]:
    """Single-token spellings of `letter` ("A" and " A" where each is one token)."""
    ids = {tuple(tokenizer(v, add_special_tokens=False)["input_ids"]) for v in (letter, " " + letter)}
    return sorted(i[0] for i in ids if len(i) == 1)


def _truncate(tokenizer, text: str, max_tokens: int | None) -> str:
    if not max_tokens:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


@torch.no_grad()
def preference_probs(model, tokenizer, triples: list[tuple[str, str, str]], batch_size: int = 4,
                     max_response_tokens: int | None = 512, system: str | None = None,
                     prompt: str = JUDGE_PROMPT, answer_prefix: str = JUDGE_ANSWER_PREFIX,
                     progress: bool = False) -> list[float]:
    """P("A") / (P("A") + P("B")) for the judge prompt of each (instruction, a, b): one forward each.

    Prompts are sorted by length (ties by content) for batching, so a set of prompts is
    always batched the same way whatever order the triples come in.
    """
    a_ids, b_ids = _letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B")
    if not a_ids or not b_ids or set(a_ids) & set(b_ids):
        raise ValueError("the judge's tokenizer has no single-token 'A' / 'B' answers")
    parts = template_parts(tokenizer, system)
    prefix = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    encoded = []
    for instruction, a, b in triples:
        text = prompt.format(instruction=instruction, a=_truncate(tokenizer, a, max_response_tokens),
                             b=_truncate(tokenizer, b, max_response_tokens))
        encoded.append(encode_prompt(tokenizer, text, parts=parts)[0] + prefix)
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    probs = [0.0] * len(encoded)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="judge", unit="batch")
    for s in starts:
        chunk = order[s: s + batch_size]
        batch = pad_batch([{"input_ids": encoded[i], "prompt_start": 0, "prompt_length": 0} for i in chunk],
                          pad_id, side="right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(chunk), device=device), mask.sum(1) - 1]
        logp = head(last).float().log_softmax(-1)
        diff = logp[:, a_ids].logsumexp(-1) - logp[:, b_ids].logsumexp(-1)
        for i, p in zip(chunk, torch.sigmoid(diff).tolist()):
            probs[i] = p
    return probs


def win_rate(scores: list[float]) -> dict:
    """Win rate (percent) and its standard error from per-instruction scores in {0, 0.5, 1}."""
    n = len(scores)
    mean = sum(scores) / n if n else float("nan")
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else float("nan")
    return {
        "n": n, "wins": sum(s == 1.0 for s in scores), "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s == 0.0 for s in scores), "win_rate": round(100 * mean, 2),
        "standard_error": round(100 * math.sqrt(var / n), 2) if n > 1 else None,
    }


def judge_pairwise(model, tokenizer, outputs: list[dict], reference: list[dict], margin: float = 0.05,
                   batch_size: int = 4, max_response_tokens: int | None = 512, system: str | None = None,
                   prompt: str = JUDGE_PROMPT, answer_prefix: str = JUDGE_ANSWER_PREFIX,
                   progress: bool = False) -> dict:
    """Compare `outputs` with `reference` (AlpacaEval-format lists) per instruction.

    Both orders are scored (outputs as A, then as B) and the two preference probabilities for
    `outputs` are averaged: p. A win is p > 0.5 + margin, a loss p < 0.5 - margin, else a tie.
    Win rate = (wins + ties / 2) / n, per `dataset` subset and overall, with standard errors.
    Every output's instruction must appear in `reference`.
    """
    ref = {r["instruction"]: r for r in reference}
    missing = [o["instruction"] for o in outputs if not isinstance(ref.get(o["instruction"], {}).get("output"), str)]
    if missing:
        raise ValueError(f"{len(missing)} instruction(s) of the outputs are not in the reference (or have no "
                         f"reference output), e.g. {missing[0][:80]!r}")
    pairs = [(o["instruction"], o["output"], ref[o["instruction"]]["output"]) for o in outputs]
    triples = [(i, a, b) for i, a, b in pairs] + [(i, b, a) for i, a, b in pairs]
    probs = preference_probs(model, tokenizer, triples, batch_size, max_response_tokens, system, prompt,
                             answer_prefix, progress)
    n, rows, by_subset = len(pairs), [], {}
    for k, o in enumerate(outputs):
        first, second = probs[k], 1.0 - probs[n + k]  # P(outputs better) in each order
        p = (first + second) / 2
        score = 1.0 if p > 0.5 + margin else 0.0 if p < 0.5 - margin else 0.5
        dataset = o.get("dataset") or ref[o["instruction"]].get("dataset") or "custom"
        rows.append({"instruction": o["instruction"], "dataset": dataset, "p_output_first": round(first, 5),
                     "p_output_second": round(second, 5), "preference": round(p, 5), "score": score})
        by_subset.setdefault(dataset, []).append(score)
    return {
        "overall": win_rate([r["score"] for r in rows]),
        "per_dataset": {name: win_rate(s) for name, s in sorted(by_subset.items())},
        "mean_preference": round(sum(r["preference"] for r in rows) / max(n, 1), 5),
        "position_bias": round(sum(probs) / max(len(probs), 1), 5),  # mean P("A"): 0.5 = unbiased
        "margin": margin, "max_response_tokens": max_response_tokens, "prompt": prompt,
        "answer_prefix": answer_prefix, "system": system,
        "annotations": rows,
    }


def format_report(report: dict) -> str:
    """The judge report as a small text table."""
    lines = [f"{'subset':<16}{'n':>5}{'win rate':>10}{'SE':>7}  wins/ties/losses"]
    for name, r in [*report["per_dataset"].items(), ("overall", report["overall"])]:
        se = "n/a" if r["standard_error"] is None else f"{r['standard_error']:.2f}"
        lines.append(f"{name:<16}{r['n']:>5}{r['win_rate']:>9.2f}%{se:>7}"
                     f"  {r['wins']}/{r['ties']}/{r['losses']}")
    return "\n".join(lines)


# -- judge-free quality proxy --------------------------------------------------------------------
@torch.no_grad()
# -- data preparation ----------------------------------------------------------------------------
def split_alpaca_eval(out_dir: str | os.PathLike, source: str | None = None, train_size: int = 600,
                      seed: int = 0) -> dict:
    """Write a fixed seeded split of the AlpacaEval file: train.json (its reference outputs are
    the training targets), heldout.json (the rest, same AlpacaEval format) and split.json."""
    source = source or str(data_root() / ALPACA_EVAL_FILE)
    if not Path(source).is_file():
        raise FileNotFoundError(f"{source}: the AlpacaEval file is missing (set CSREFT_DATA or pass --source)")
    raw_bytes = Path(source).read_bytes()
    records = json.loads(raw_bytes)
    if not 0 < train_size < len(records):
        raise ValueError(f"train_size={train_size}: must be between 1 and {len(records) - 1}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    train, heldout = sorted(order[:train_size]), sorted(order[train_size:])
    out = Path(out_dir)
    _write_json_atomic(out / "train.json", [records[i] for i in train])
    _write_json_atomic(out / "heldout.json", [records[i] for i in heldout])
    info = {"source": str(source), "sha256": hashlib.sha256(raw_bytes).hexdigest(), "seed": seed,
            "train": len(train), "heldout": len(heldout), "train_indices": train, "heldout_indices": heldout}
    _write_json_atomic(out / "split.json", info)
    return info


def _rating(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def ultrafeedback_best(record: dict, score: str = "fine-grained_score") -> dict | None:
    """An openbmb/UltraFeedback record -> {"prompt", "response", "source"} with its best-rated
    completion, or None when no completion has a usable rating and response.

    score: "fine-grained_score" (mean of the four GPT-4 ratings: helpfulness, honesty,
    instruction following, truthfulness; the default) or "overall_score" (the critique score).
    Ties keep the first completion.
    """
    best, best_score = None, None
    for c in record.get("completions") or []:
        value = _rating(c.get(score))
        if value is None and score == "fine-grained_score":
            ratings = [_rating(a.get("Rating")) for a in (c.get("annotations") or {}).values()
                       if isinstance(a, dict)]
            ratings = [r for r in ratings if r is not None]
            value = sum(ratings) / len(ratings) if ratings else None
        text = c.get("response")
        if value is not None and isinstance(text, str) and text.strip() and (best_score is None or value > best_score):
            best, best_score = c, value
    prompt = record.get("instruction")
    if best is None or not isinstance(prompt, str) or not prompt.strip():
        return None
    return {"prompt": prompt, "response": best["response"].strip(), "source": record.get("source")}


def prepare_ultrafeedback(output: str | os.PathLike, dataset: str = "openbmb/UltraFeedback",
                          score: str = "fine-grained_score", limit: int | None = None) -> dict:
    """Convert UltraFeedback (Hub; needs network) into prompt/response JSONL for `csreft train`."""
    import datasets

    rows = datasets.load_dataset(dataset, split="train")
    out, kept, skipped = Path(output), 0, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in rows:
            if limit is not None and kept >= limit:
                break
            row = ultrafeedback_best(dict(record), score)
            if row is None:
                skipped += 1
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            kept += 1
    os.replace(tmp, out)
    return {"output": str(out), "records": kept, "skipped": skipped, "score": score}
