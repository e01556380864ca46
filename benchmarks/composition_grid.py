#!/usr/bin/env python
"""Composition on the grid suite: do a task and a style compose on cells never trained together?

    python benchmarks/composition_grid.py [--output-dir runs/grid] [--split validation|test]
        [--models base,loreft,lora,lora-merge,gated,layers,positions,dropin,dropin-neg,positions-neg,generated]
        [--steps 300]
        [--lr 3e-3] [--lora-lr 3e-3] [--fit-examples 32] [--seed 0]
    python benchmarks/composition_grid.py --pool runs/grid-test-s0,runs/grid-test-s1,runs/grid-test-s2 --split test

The suite (csreft.evaluation.grid): 5 tasks x 4 styles; each style is trained on two tasks'
answers; held-out cells are scored on `--split` (validation cells for choosing a mechanism, test
cells for the result; never both in one screening). Models, all on the same training records:
  base       the frozen model;
  loreft     one LoReFT edit of rank 9 r (the 9 subspaces' parameters), data-mixed, no gates;
  lora       PEFT LoRA on q_proj, v_proj at the same parameter count, data-mixed;
  lora-merge one LoRA per skill (a task's on its plain records, a style's on its seen cells, each
             its share of the joint budget's steps, or --lora-skill-steps), a cell = its two LoRAs
             merged by PEFT's add_weighted_adapter: "union" = cat at weights (1, 1), fixed in
             advance (it adds the two updates, as a gate union adds two edits; linear and ties
             at (1, 1) reported too), "fitted" = the combination and weights best on validation
             cells (2-fold over them when screening);
  gated      CS-ReFT, k = 9 (one subspace per skill), trained with --train-gates skills: a plain
             task record under its task's gate, a seen-cell record under task + style;
  layers     gated, tasks at the first two edited layers, styles at the last two (placement);
  positions  gated, tasks at the first prompt positions, styles at the last (placement);
  dropin     gated with --gate-dropin 0.25 (other subspaces on at -1 or 1, composable training);
  dropin-neg gated with --gate-dropin 0.25 --dropin-factors -1: other subspaces subtracted only (a
             +1 drop-in with the target unchanged teaches a style to do nothing beside a task);
  positions-neg  positions with the drop-ins of dropin-neg;
  generated  gated with edit_generated: the response tokens are edited too (styles act on the output).
CS-ReFT models score held-out cells with the union of the cell's two skills (gate 1 each), and
with per-layer weights of "the task" and "the style" fitted on --fit-examples composed records
of the validation cells (CAT-style; with --split validation, 2-fold over those cells, so a
cell's score never comes from weights fitted on it). Scores: exact, task right, style right
(csreft.evaluation.grid), single skills (plain tasks; styles on their seen tasks), and removal:
each single-skill record with one other skill's gate at -1. Writes OUTPUT_DIR/grid-SPLIT.json
and grid-SPLIT.md (one per split); trained adapters are reused when their training key (options
and the training data's digest) matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from csreft import CSReftConfig, CSReftModel, get_csreft_model  # noqa: E402
from csreft.base_models import DEFAULT_MODEL, load_base  # noqa: E402
from csreft.data import SupervisedDataset, pad_batch  # noqa: E402
from csreft.evaluation.grid import STYLES, TASKS, grid_scores, grid_suite, summarise  # noqa: E402
from csreft.generation import generate_texts  # noqa: E402
from csreft.training.recipe import run as train_run  # noqa: E402

MODELS = ("base", "loreft", "lora", "lora-merge", "gated", "layers", "positions", "dropin", "dropin-neg", "positions-neg",
          "generated")
MERGES = ("linear", "cat", "ties")  # PEFT add_weighted_adapter combination types
MERGE_WEIGHTS = ((1.0, 1.0), (0.5, 0.5), (1.0, 0.5), (0.5, 1.0))
SKILLS = sorted(TASKS + STYLES)  # subspace i of a --train-gates skills adapter is the i-th sorted skill


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output-dir", default="runs/grid")
    p.add_argument("--split", choices=("validation", "test"), default="validation")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-skill", type=int, default=100)
    p.add_argument("--test-per-skill", type=int, default=20)
    p.add_argument("--cell-records", type=int, default=15, help="records per held-out cell")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the edit models")
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--lora-skill-steps", type=int, default=0, help="training steps of each per-skill LoRA of lora-merge "
                   "(0: its share of the joint budget, --steps / 9; more: each trained further, towards its plateau)")
    p.add_argument("--layers", default="3,9,18,24")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--fit-examples", type=int, default=32, help="composed validation records for fitted weights (0: none)")
    p.add_argument("--fit-steps", type=int, default=40)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--pool", default=None, help="comma-separated output dirs or grid-SPLIT.json files of finished "
                   "runs (one seed's models may be spread over several): write OUTPUT_DIR/grid-SPLIT-pooled.md "
                   "with paired tests over their records, and train nothing")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    if args.lora_skill_steps < 0:
        p.error(f"--lora-skill-steps: {args.lora_skill_steps}; allowed: 0 (the share of --steps) or a positive count")
    return args


def adapter_options(name: str, args, layers: list[int]) -> dict | None:
    """csreft train options of an edit model (None: not an edit model)."""
    early, late = ",".join(map(str, layers[:len(layers) // 2])), ",".join(map(str, layers[len(layers) // 2:]))
    every = ",".join(map(str, layers))
    gated = dict(num_subspaces=len(SKILLS), train_gates="skills", use_router=True)

    def placed(task_site: str, style_site: str) -> str:  # one entry per subspace, in SKILLS order
        return ";".join(task_site if s in TASKS else style_site for s in SKILLS)

    return {
        "loreft": dict(num_subspaces=1, use_router=False, rank=args.rank * len(SKILLS)),
        "gated": gated,
        "layers": {**gated, "placement": placed(early, late)},
        "positions": {**gated, "share_positions": False, "placement": placed(f"{every}@f", f"{every}@l")},
        "dropin": {**gated, "gate_dropin": 0.25, "dropin_factors": "-1,1"},
        "dropin-neg": {**gated, "gate_dropin": 0.25, "dropin_factors": "-1"},
        "positions-neg": {**gated, "share_positions": False, "placement": placed(f"{every}@f", f"{every}@l"),
                          "gate_dropin": 0.25, "dropin_factors": "-1"},
        "generated": {**gated, "edit_generated": True},
    }.get(name)


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def train_edits(name, args, out: Path, data: str, layers) -> Path:
    opts = dict(model=args.model, data=data, output_dir=str(out / name), max_steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, logging_steps=max(1, args.steps // 10),
                max_length=args.max_length, layers=args.layers, rank=args.rank, positions="f7+l7")
    opts.update(adapter_options(name, args, layers))
    # the data by its digest, not its path: an adapter copied to another output dir is reused
    key = {**{k: v for k, v in opts.items() if k not in ("output_dir", "data")}, "data_sha256": digest(data)}
    key_file, adapter = out / name / "grid-key.json", out / name / "adapter"
    saved = json.loads(key_file.read_text()) if key_file.exists() else None
    if saved is not None and (adapter / "csreft_config.json").exists() and {k: v for k, v in saved.items() if k != "data"} == key:
        return adapter
    train_run({**opts, "overwrite": True})
    key_file.write_text(json.dumps(key))
    return adapter


def train_lora(base, tokenizer, args, records, out: Path, target: int, steps: int | None = None):
    """PEFT LoRA (q_proj, v_proj) at about `target` parameters on the shuffled records."""
    from peft import LoraConfig, get_peft_model

    from csreft.comparison.options import CompareOptions
    from csreft.comparison.runner import _train, lora_rank_for, training_stream

    rank = lora_rank_for(base, target)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opts = CompareOptions(batch_size=args.batch_size, max_length=args.max_length, output_dir=str(out))
    stream = training_stream(records, (steps or args.steps) * args.batch_size, args.seed)
    seconds = _train(model, tokenizer, stream, opts, args.seed, out / "lora", args.lora_lr, lora=True)
    return model, rank, seconds


def lora_key(args, out: Path, target: int, steps: int) -> dict:
    """What a trained LoRA depends on: it is reused when a later run's key is the same."""
    return {"steps": steps, "lr": args.lora_lr, "seed": args.seed, "target": target, "model": args.model,
            "batch_size": args.batch_size, "max_length": args.max_length, "data_sha256": digest(out / "train.jsonl")}


def saved_key(where: Path) -> dict | None:
    key = where / "grid-key.json"
    return json.loads(key.read_text()) if key.exists() and (where / "adapter_config.json").exists() else None


def mixed_lora(base, tokenizer, args, records, out: Path, target: int):
    """The data-mixed LoRA: trained once per key, saved under OUT/lora and reused."""
    from peft import PeftModel

    from csreft.comparison.runner import lora_rank_for

    where, key = out / "lora", lora_key(args, out, target, args.steps)
    if saved_key(where) == key:
        rank = lora_rank_for(base, target)  # before PEFT wraps the projections
        return PeftModel.from_pretrained(base, where).eval(), rank, 0.0
    model, rank, seconds = train_lora(base, tokenizer, args, records, where, target)
    model.save_pretrained(where)
    (where / "grid-key.json").write_text(json.dumps(key))
    return model, rank, seconds


def lora_merge(base, tokenizer, args, suite, held, out: Path, target: int, max_new: int) -> tuple[dict, object]:
    """Per-skill LoRAs, merged per cell; returns (the row, the base with no adapter left)."""
    from peft import PeftModel

    steps = args.lora_skill_steps or max(1, round(args.steps / len(SKILLS)))  # default: its share of the joint run's steps
    key = lora_key(args, out, target, steps)
    from csreft.comparison.runner import lora_rank_for

    row, seconds = {"lora_steps_per_skill": steps, "lora_rank": lora_rank_for(base, target)}, 0.0
    for skill in SKILLS:
        where = out / "lora-skills" / skill
        if saved_key(where) == key:
            continue
        model, _, t = train_lora(base, tokenizer, args, [r for r in suite.train if r["skill"] == skill],
                                 where, target, steps)
        seconds += t
        model.save_pretrained(where)
        base = model.unload()
        (where / "grid-key.json").write_text(json.dumps(key))
    row["train_seconds"] = seconds
    model = PeftModel.from_pretrained(base, out / "lora-skills" / SKILLS[0], adapter_name=SKILLS[0])
    for skill in SKILLS[1:]:
        model.load_adapter(out / "lora-skills" / skill, adapter_name=skill)
    model.eval()
    outputs = [None] * len(suite.test)
    for skill in SKILLS:  # each skill alone: its own LoRA
        mine = [i for i, r in enumerate(suite.test) if r["skill"] == skill]
        model.set_adapter(skill)
        for i, text in zip(mine, generate(model, tokenizer, [suite.test[i] for i in mine], max_new)):
            outputs[i] = text
    row["single"] = summarise(suite.test, outputs)

    def merged(records, kind, weights) -> list[str]:
        texts = []
        for cell in sorted({r["cell"] for r in records}):
            mine = [r for r in records if r["cell"] == cell]
            name = f"merge-{cell}"
            model.add_weighted_adapter([mine[0]["task"], mine[0]["style"]], list(weights), name, combination_type=kind,
                                       density=0.5 if "ties" in kind else None)
            model.set_adapter(name)
            texts += [(r, o) for r, o in zip(mine, generate(model, tokenizer, mine, max_new))]
            model.delete_adapter(name)
        return texts

    choices = [(kind, w) for kind in MERGES for w in MERGE_WEIGHTS]
    scored = {c: merged(held, *c) for c in choices}
    for kind in MERGES:  # each combination at weights (1, 1)
        ones = scored[(kind, MERGE_WEIGHTS[0])]
        row[f"union-{kind}"] = summarise([r for r, _ in ones], [o for _, o in ones])
    row["union"] = row["union-cat"]  # fixed in advance: cat adds the two LoRAs' updates, as a gate union adds edits
    row["fitted"], fitted_pairs = chosen_merge(suite.validation, scored, args, lambda recs, c: merged(recs, *c))
    row["outputs"] = {"single": outputs, "union": in_order(held, scored[("cat", MERGE_WEIGHTS[0])]),
                      "fitted": in_order(held, fitted_pairs)}
    return row, model.unload()


def in_order(records, pairs) -> list[str]:
    """The outputs of (record, output) pairs in the order of `records` (each record once)."""
    by_id = {id(r): o for r, o in pairs}
    if set(by_id) != {id(r) for r in records}:
        raise ValueError("the pairs do not cover the records exactly")
    return [by_id[id(r)] for r in records]


def chosen_merge(val, scored, args, run) -> tuple[dict, list]:
    """The merge (combination type, weights) chosen on validation cells: for the test cells, the
    choice best on all of them; when `scored` holds the validation cells, 2-fold over them (a
    cell is scored with the choice best on the other half). Returns (the row, its (record,
    output) pairs)."""
    def exact(pairs, cells):
        rows = [(r, o) for r, o in pairs if r["cell"] in cells]
        return sum(grid_scores(r, o)["exact"] for r, o in rows) / max(1, len(rows))

    cells = sorted({r["cell"] for r in val})
    if args.split == "test":
        on_val = {c: run(val, c) for c in scored}
        best = max(scored, key=lambda c: exact(on_val[c], set(cells)))
        pairs, chosen = scored[best], [best]
    else:
        pairs, chosen = [], []
        for half in (set(cells[0::2]), set(cells[1::2])):
            best = max(scored, key=lambda c: exact(scored[c], half))
            pairs += [(r, o) for r, o in scored[best] if r["cell"] not in half]
            chosen.append(best)
    return {**summarise([r for r, _ in pairs], [o for _, o in pairs]), "weights": chosen}, pairs


def generate(model, tokenizer, records, max_new_tokens, gates=None) -> list[str]:
    return generate_texts(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                          gates=gates, batch_size=16)


def union_gates(records, k=len(SKILLS)) -> torch.Tensor:
    g = torch.zeros(len(records), k)
    for i, r in enumerate(records):
        g[i, [SKILLS.index(s) for s in r["skills"]]] = 1.0
    return g


def role_gates(records, weights: torch.Tensor) -> torch.Tensor:
    """(N, layers, k) gates: at each layer l the task's subspace at weights[l, 0], the style's at
    weights[l, 1] (differentiable in weights)."""
    task = torch.zeros(len(records), len(SKILLS))
    style = torch.zeros(len(records), len(SKILLS))
    for i, r in enumerate(records):
        task[i, SKILLS.index(r["task"])] = 1.0
        style[i, SKILLS.index(r["style"])] = 1.0
    return task[:, None, :] * weights[None, :, 0:1] + style[:, None, :] * weights[None, :, 1:2]


def fit_weights(model, tokenizer, records, steps: int, max_length: int) -> torch.Tensor:
    """Per-layer (task, style) gate weights that minimise the response loss on composed records
    (everything else frozen), from 1, 1 at every layer."""
    records = [r for r in records if SupervisedDataset([r], tokenizer, max_length).examples]  # as trained: not cut
    if not records:
        raise ValueError(f"no composed record fits in --max-length {max_length}")
    batch = pad_batch(SupervisedDataset(records, tokenizer, max_length).examples, tokenizer.pad_token_id)
    weights = torch.ones(len(model.csreft_config.layers), 2, requires_grad=True)
    opt = torch.optim.Adam([weights], lr=0.05)
    for _ in range(steps):
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "prompt_starts", "prompt_lengths")},
                     gates=role_gates(records, weights), full_logits=False).loss  # LM head at the answer only
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weights.detach()


def removal(model, tokenizer, records, max_new_tokens, seed) -> dict:
    """Single-skill records under their own gates, then with one other skill's gate at -1."""
    own = union_gates(records)
    rng = random.Random(f"{seed}:removal")
    minus = own.clone()
    for i, r in enumerate(records):
        others = [j for j, s in enumerate(SKILLS) if s not in r["skills"]]
        minus[i, rng.choice(others)] = -1.0
    a = summarise(records, generate(model, tokenizer, records, max_new_tokens, own))["all"]["exact"]
    b = summarise(records, generate(model, tokenizer, records, max_new_tokens, minus))["all"]["exact"]
    return {"own": a, "other_at_minus_1": b, "drop": a - b}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.pool:
        return {"pooled": pool(args)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = build_suite(vars(args))
    held = suite.validation if args.split == "validation" else suite.composed
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "response", "answer", "skill", "skills")}) + "\n"
                            for r in suite.train))
    base, tokenizer = load_base(args.model or DEFAULT_MODEL)
    max_new = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"])
                  for r in suite.train + suite.validation) + 4  # never read off the test cells
    layers = [int(x) for x in args.layers.split(",")]
    saved = out / f"grid-{args.split}.json"  # one file per split: a table never mixes them
    results = json.loads(saved.read_text()).get("models", {}) if saved.exists() else {}
    stale = sorted(n for n, row in results.items() if row.get("suite", suite_args(vars(args))) != suite_args(vars(args)))
    if stale:  # rows of another suite (seed, sizes) would be paired with the wrong records
        print(f"[grid] {saved}: dropping rows of another suite: {', '.join(stale)}", file=sys.stderr)
        results = {n: row for n, row in results.items() if n not in stale}
    report = {"args": vars(args), "cells": suite.info["cells"], "models": results}
    for name in args.models:
        started = time.time()
        row = {"split": args.split, "suite": suite_args(vars(args))}
        if name == "base":
            model = base
        elif name in ("lora", "lora-merge"):  # at the parameter count of the 9 subspaces' edits
            probe = get_csreft_model(base, CSReftConfig(layers=layers, rank=args.rank, num_subspaces=len(SKILLS)))
            target = probe.trainable_parameters()["edits"]
            probe.remove_hooks()
            if name == "lora-merge":
                merged_row, base = lora_merge(base, tokenizer, args, suite, held, out, target // len(SKILLS), max_new)
                row.update(merged_row)
                results[name] = {**row, "seconds": round(time.time() - started, 1)}
                saved.write_text(json.dumps(report, indent=1))
                continue
            model, row["lora_rank"], row["train_seconds"] = mixed_lora(base, tokenizer, args, suite.train, out, target)
        else:
            adapter = train_edits(name, args, out, str(data), layers)
            model = CSReftModel.from_pretrained(base, adapter).eval()
            if name != "loreft" and model.skill_names != SKILLS:
                raise RuntimeError(f"{adapter}: subspaces {model.skill_names}, expected {SKILLS}")
        gated = name not in ("base", "loreft", "lora", "lora-merge")
        test_gates = union_gates(suite.test) if gated else None
        single = generate(model, tokenizer, suite.test, max_new, test_gates)
        union = generate(model, tokenizer, held, max_new, union_gates(held) if gated else None)
        row["single"], row["union"] = summarise(suite.test, single), summarise(held, union)
        row["outputs"] = {"single": single, "union": union}  # in suite.test / held-out order
        if gated:
            row["removal"] = removal(model, tokenizer, suite.test, max_new, args.seed)
        if gated and args.fit_examples:
            row["fitted"], row["outputs"]["fitted"] = fitted(model, tokenizer, suite, held, args, max_new)
        row["seconds"] = round(time.time() - started, 1)
        results[name] = row
        if name == "lora":
            base = model.unload()
        elif isinstance(model, CSReftModel):
            model.remove_hooks()
        saved.write_text(json.dumps(report, indent=1))
        print(f"[grid] {name}: single {row['single']['all']['exact']:.3f}, held-out exact "
              f"{row['union']['all']['exact']:.3f} task {row['union']['all']['task']:.3f} style "
              f"{row['union']['all']['style']:.3f} ({row['seconds']:.0f} s)", file=sys.stderr)
    text = table(report) + "\n" + paired_table([report])
    saved.with_suffix(".md").write_text(text)
    print(text)
    return report


def pool(args) -> str:
    """--pool: one table over finished runs of --split (3 seeds: the final comparison). An entry is
    an output dir or a saved grid-SPLIT.json; entries of one seed with other models (runs split over
    folders to use more cores) are joined into that seed's report."""
    by_seed, where = {}, {}
    for d in (d.strip() for d in args.pool.split(",")):
        path = Path(d) if d.endswith(".json") else Path(d) / f"grid-{args.split}.json"
        if not path.exists():
            raise SystemExit(f"--pool: {path} does not exist (run --split {args.split} with --output-dir {d} first)")
        report = json.loads(path.read_text())
        if report["args"]["split"] != args.split:
            raise SystemExit(f"--pool: {path} holds split {report['args']['split']}, not --split {args.split}")
        first = next(iter(by_seed.values()), report)
        differ = [k for k in POOL_ARGS if report["args"][k] != first["args"][k]]
        if differ:
            raise SystemExit(f"--pool: {path} differs from the first run in {', '.join(differ)}")
        seed = report["args"]["seed"]
        joined = by_seed.setdefault(seed, {**report, "models": {}})
        for name, row in report["models"].items():
            if name in joined["models"]:  # the same records twice would narrow the CI falsely
                raise SystemExit(f"--pool: seed {seed}, model {name} is in both {where[seed, name]} and {path}: "
                                 "each run of a model must be another seed")
            joined["models"][name], where[seed, name] = {**row, "steps": trained_steps(name, row, report["args"])}, path
    for name in MODELS:  # a model's length is its own setting: models may differ, one model's seeds may not
        steps = {r["models"][name]["steps"] for r in by_seed.values() if name in r["models"]}
        if len(steps) > 1:
            raise SystemExit(f"--pool: the {name} rows differ in training steps ({sorted(steps)}): "
                             "the seeds of one model must train it for as long")
    reports = [{**r, "models": {n: r["models"][n] for n in MODELS if n in r["models"]}} for r in by_seed.values()]
    scored = [correctness(r) for r in reports]
    dropped = sorted(set().union(*scored) - set.intersection(*map(set, scored)))
    if dropped:
        print(f"[grid] --pool: left out (not in every run): {', '.join(dropped)}", file=sys.stderr)
    text = paired_table(reports, scored)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"grid-{args.split}-pooled.md").write_text(text)
    print(text)
    return text


def fitted(model, tokenizer, suite, held, args, max_new) -> tuple[dict, list[str]]:
    """Fitted per-layer (task, style) weights: on the validation cells for the test cells; with
    --split validation, 2-fold over the validation cells (fit on two, score the other two).
    Returns (the row, the outputs in held-out order)."""
    val = suite.validation
    cells = sorted({r["cell"] for r in val})
    if args.split == "test":
        folds = [(val, held)]
    else:
        halves = [set(cells[0::2]), set(cells[1::2])]
        folds = [([r for r in val if r["cell"] in h], [r for r in val if r["cell"] not in h]) for h in halves]
    records, outputs, weights = [], [], []
    for fit_on, score_on in folds:
        rng = random.Random(f"{args.seed}:fit")
        sample = rng.sample(fit_on, min(args.fit_examples, len(fit_on)))
        w = fit_weights(model, tokenizer, sample, args.fit_steps, args.max_length)
        weights.append(w.tolist())
        records += score_on
        outputs += generate(model, tokenizer, score_on, max_new, role_gates(score_on, w))
    return {**summarise(records, outputs), "weights": weights}, in_order(held, zip(records, outputs))


BASELINES = (("lora", "union"), ("lora-merge", "union"), ("lora-merge", "fitted"))


SUITE_ARGS = ("seed", "train_per_skill", "test_per_skill", "cell_records", "split")
POOL_ARGS = ("model", "split", "train_per_skill", "test_per_skill", "cell_records", "batch_size", "lr",
             "lora_lr", "layers", "rank", "max_length")  # what seeds pooled together must share (steps: per model)


def trained_steps(name, row, args) -> int:
    """The training steps of a row: a merge's per-skill LoRAs' steps, the run's --steps otherwise."""
    if "steps" in row:  # a pooled row
        return row["steps"]
    return 0 if name == "base" else row["lora_steps_per_skill"] if name == "lora-merge" else args["steps"]


def suite_args(a: dict) -> dict:
    """What a row's held-out records depend on (its outputs are in their order)."""
    return {k: a[k] for k in SUITE_ARGS}


def build_suite(a: dict):
    """The grid suite of a run's args (as a dict): the records its rows' outputs follow."""
    return grid_suite(a["seed"], a["train_per_skill"], a["test_per_skill"], composed=8 * a["cell_records"],
                      validation=4 * a["cell_records"])


def held_records(a: dict) -> list[dict]:
    """The held-out records a report's outputs are in the order of (rebuilt from its args)."""
    suite = build_suite(a)
    return suite.validation if a["split"] == "validation" else suite.composed


def correctness(report) -> dict[str, list[bool]]:
    """Exact match per held-out record, for each "model kind" (kind: union or fitted) with outputs."""
    out = {}
    for name, row in report["models"].items():
        held = held_records(row.get("suite", report["args"]))  # rows saved before "suite" share the report's
        for kind, texts in row.get("outputs", {}).items():
            if kind != "single":
                out[f"{name} {kind}"] = [grid_scores(r, o)["exact"] for r, o in zip(held, texts, strict=True)]
    return out


def paired_table(reports, scored=None) -> str:
    """Held-out exact accuracy pooled over reports (seeds: the same split, records concatenated),
    and each CS-ReFT composition against each baseline: paired bootstrap CI and McNemar p.
    `scored`: the reports' correctness(), when the caller has it already."""
    from csreft.evaluation.stats import mcnemar, paired_bootstrap

    scored = scored or [correctness(r) for r in reports]
    keys = [k for k in scored[0] if all(k in s for s in scored)]
    pooled = {k: [x for s in scored for x in s[k]] for k in keys}
    names = {k.split(" ")[0] for k in keys} - {"base"}
    steps = [f"{n} {trained_steps(n, row, reports[0]['args'])}" + (" per skill" if n == "lora-merge" else "")
             for n, row in reports[0]["models"].items() if n in names]  # a pool's seeds share each model's
    lines = [f"Held-out exact, pooled over {len(reports)} run(s) (seeds {', '.join(str(r['args']['seed']) for r in reports)})",
             "", *([f"Training steps: {', '.join(steps)}", ""] if steps else []),
             "| model | composition | n | exact | vs | difference (95% CI) | McNemar p |", "|---|---|---|---|---|---|---|"]
    baselines = [f"{m} {k}" for m, k in BASELINES if f"{m} {k}" in pooled]
    for key in keys:
        name, kind = key.split(" ")
        acc = 100 * sum(pooled[key]) / len(pooled[key])
        if key in baselines or name in ("base", "loreft", "lora", "lora-merge"):
            lines.append(f"| {name} | {kind} | {len(pooled[key])} | {acc:.1f} | | | |")
            continue
        for other in baselines:
            d, lo, hi = paired_bootstrap(pooled[key], pooled[other])
            lines.append(f"| {name} | {kind} | {len(pooled[key])} | {acc:.1f} | {other} | {100 * d:+.1f} "
                         f"({100 * lo:+.1f}, {100 * hi:+.1f}) | {mcnemar(pooled[key], pooled[other]):.3f} |")
    return "\n".join(lines) + "\n"


def table(report) -> str:
    lines = [f"Grid composition ({report['args']['split']} cells: "
             f"{', '.join(report['cells'][report['args']['split'] if report['args']['split'] == 'validation' else 'test'])})",
             "", "| model | single skills | held-out exact | task right | style right | fitted exact | removal drop |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["models"].items():
        u = row["union"]["all"]
        fit = f"{row['fitted']['all']['exact']:.3f}" if "fitted" in row else "n/a"
        rem = f"{row['removal']['drop']:+.3f}" if "removal" in row else "n/a"
        lines.append(f"| {name} | {row['single']['all']['exact']:.3f} | {u['exact']:.3f} | {u['task']:.3f} | "
                     f"{u['style']:.3f} | {fit} | {rem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
