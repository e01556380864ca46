"""Comparison runner: does CS-ReFT reduce interference between skills?

On one suite, with the same data order, seed and step budget, it trains and scores methods:
  base         the frozen model, no training;
  loreft       one LoReFT edit (k = 1, no router) of rank (k + shared) * r: the same edit
               parameters as CS-ReFT;
  specialists  one LoReFT per skill, trained on exactly the examples of that skill that the
               joint runs saw, in the same order: the no-interference reference. At the
               joint batch size a specialist takes about 1/k of the joint run's optimizer
               steps; specialist_batch_size ~ batch_size / k gives it about as many steps;
  csreft       k subspaces with a learned (unsupervised) router;
  csreft_supervised  the same, with the skill-supervised routing loss;
  lora         PEFT LoRA on q_proj and v_proj at CS-ReFT's total trainable-parameter count;
  lora_edits   the same at CS-ReFT's edit parameters only (without the router).
Variants of the CS-ReFT methods are named in the method list with CSReftConfig fields, e.g.
`csreft[gating=hard,sparsity_weight=0.01]`; every method also takes `lr=`. Each variant is a
method of its own: its own learning rate, row, gate heatmap and paired tests.

Learning rates: unless fixed (`lr`), each method's is chosen from a per-family grid by
validation accuracy after `select_steps` steps (seed 0) on a validation split carved from the
training pool; the final runs train on the rest of the pool. The test split is read only by
the final runs. Interference of a joint method on a skill = specialist accuracy - joint
accuracy. Paired tests (McNemar, paired bootstrap) compare methods on the same test examples,
pooled over seeds. A run whose result.json was written with the same settings is reused, so
methods can be added to an existing comparison. Writes report.json, report.md and one gate
heatmap (skill x subspace) per CS-ReFT run; see report.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import time

from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ..config import CSReftConfig
from ..data import Collator, SupervisedDataset, encode_example, pad_batch, template_parts
from ..evaluation.scoring import evaluate_suite
from ..model import get_csreft_model
from .report import _slug, plot_gates, write_report
from ..router import routing_nmi
from ..training.options import DEFAULTS
from ..training.trainer import (CSReftTrainer, JsonlLogger, OrderedTrainer, answer_loss, start_router,
                                training_arguments)
from .methods import ROUTED, SINGLE_EDIT, Method, parse_methods
from .options import CompareOptions

def training_stream(records: list[dict], n: int, seed: int) -> list[dict]:
    """The first n records of seeded shuffled passes over `records`: what a joint run sees."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        epoch = list(records)
        rng.shuffle(epoch)
        out += epoch
    return out[:n]

def split_validation(suite, per_skill: int) -> tuple[list[dict], list[dict]]:
    """(pool, validation): `per_skill` records of each skill, by a seeded shuffle, go to
    validation; the rest of the training records stay in the pool. The test split is untouched."""
    pool, val = [], []
    for skill in suite.skills:
        recs = [r for r in suite.train if r["skill"] == skill]
        order = list(range(len(recs)))
        random.Random(f"validation:{skill}").shuffle(order)
        n = min(per_skill, len(recs) // 2)
        chosen = set(order[:n])
        val += [recs[i] for i in sorted(chosen)]
        pool += [r for i, r in enumerate(recs) if i not in chosen]
    return pool, val

class Stages:
    """One line per stage (what runs, how long, ETA), from the measured seconds per step."""

    def __init__(self, total_steps: int, quiet: bool):
        self.total, self.done, self.quiet = total_steps, 0, quiet
        self.step_s: float | None = None

    def say(self, text: str, steps: int = 0) -> None:
        if self.quiet:
            return
        eta = ""
        if self.step_s and steps:  # lines of no steps (a reused run, a chosen rate) carry no estimate
            eta = f"; about {steps * self.step_s / 60:.1f} min, all runs {(self.total - self.done) * self.step_s / 60:.0f} min left"
        print(f"[csreft] {text}{eta}", flush=True)

    def begin(self, run: str, what: str, steps: int, reused: Path | None) -> None:
        """Announces a run; a finished one that is reused (from its directory) takes its steps off the total."""
        if reused:
            self.total -= steps
            self.say(f"{run}: reusing the finished run in {reused}")
        else:
            self.say(f"{run}: {what}", steps)

    def ran(self, steps: int, seconds: float) -> None:
        self.done += steps
        if steps:
            per = seconds / steps
            self.step_s = per if self.step_s is None else 0.5 * (self.step_s + per)

class _Curve(TrainerCallback):
    """A learning curve: `score()` (validation accuracy and per-record correctness) before the
    first step, every `every` steps and after the last; `seconds` is the time spent scoring (not
    training). The per-record answers let the report test a curve's gain, not only read it."""

    def __init__(self, every: int, score) -> None:
        self.every, self.score, self.points, self.seconds = every, score, [], 0.0

    def _add(self, step: int) -> None:
        t = time.time()
        res = self.score()
        by_skill = {}  # the answers per skill, in record order (the accuracy is the skills' mean)
        for skill, c in zip(res["skills"], res["correct"]):
            by_skill.setdefault(skill, []).append(bool(c))
        self.points.append({"step": step, "accuracy": res["accuracy"], "correct": by_skill})
        self.seconds += time.time() - t

    def on_train_begin(self, args, state, control, **kwargs):
        self._add(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._add(state.global_step)


def _train(model, tokenizer, records, opts: CompareOptions, seed: int, out_dir: Path, lr: float,
           skills=None, supervised=False, lora=False, batch_size: int | None = None, curve: _Curve | None = None) -> float:
    """Train on `records` in their order, one pass; returns wall seconds (without the curve's
    scoring)."""
    data = SupervisedDataset(records, tokenizer, opts.max_length, skills)
    batch_size = batch_size or opts.batch_size
    steps = math.ceil(len(data) / batch_size)
    args = training_arguments({**DEFAULTS, "output_dir": str(out_dir), "batch_size": batch_size,
                               "lr": lr, "seed": seed, "max_steps": steps, "logging_steps": min(10, steps)})
    common = dict(model=model, args=args, train_dataset=data, shuffle=False,
                  callbacks=[JsonlLogger(out_dir / "log.jsonl"), *([curve] if curve else [])])
    if not lora:
        start_router(model, data, seed=seed)
    if lora:
        trainer = _LoraTrainer(data_collator=_LoraCollator(tokenizer.pad_token_id), **common)
    else:
        trainer = CSReftTrainer(data_collator=Collator(tokenizer.pad_token_id, with_skills=supervised,
                                                       k=model.csreft_config.num_subspaces), **common)
    trainer.remove_callback(PrinterCallback)  # the stage lines say what runs; no raw log dictionaries
    trainer.remove_callback(ProgressCallback)
    started = time.time()
    trainer.train()
    model.eval()
    return time.time() - started - (curve.seconds if curve else 0.0)

class _LoraCollator(Collator):
    def __call__(self, examples):
        batch = super().__call__(examples)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "answer_mask") if k in batch}

class _LoraTrainer(OrderedTrainer):
    """A PEFT model's own loss, with the answer-token loss logged as for the other methods."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        answer_mask = inputs.pop("answer_mask", None)
        loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training and answer_mask is not None:
            labels = inputs["labels"]
            keep = labels[:, 1:] != -100
            tokens = torch.nn.functional.cross_entropy(out.logits[:, :-1][keep].float(), labels[:, 1:][keep],
                                                       reduction="none")
            self.add_stats({"task_loss": tokens.mean(), "answer_loss": answer_loss(tokens, labels, answer_mask)})
        return (loss, out) if return_outputs else loss

def lora_rank_for(base, target_parameters: int, modules=("q_proj", "v_proj")) -> int:
    """LoRA rank whose trainable-parameter count is closest to `target_parameters`."""
    per_rank = sum(m.in_features + m.out_features for name, m in base.named_modules()
                   if name.split(".")[-1] in modules and isinstance(m, torch.nn.Linear))
    return max(1, round(target_parameters / per_rank))

def route_records(model, tokenizer, records, batch_size: int) -> torch.Tensor:
    """Gates (N, k) of `records` (their prompts), in record order."""
    parts = template_parts(tokenizer)
    gates = []
    device = next(model.parameters()).device
    for i in range(0, len(records), batch_size):
        enc = [encode_example(tokenizer, r["prompt"], parts=parts) for r in records[i:i + batch_size]]
        b = pad_batch(enc, tokenizer.pad_token_id, side="left")
        gates.append(model.route(b["input_ids"].to(device), b["attention_mask"].to(device), b["prompt_starts"]).float().cpu())
    return torch.cat(gates)

def mean_gates(model, tokenizer, suite, records, batch_size: int) -> list[list[float]]:
    """Mean gate per (skill x subspace) over `records` (rows in suite.skills order)."""
    return gate_table(route_records(model, tokenizer, records, batch_size), records, suite.skills)

def gate_table(gates: torch.Tensor, records, skills) -> list[list[float]]:
    rows = []
    for skill in skills:
        idx = [j for j, r in enumerate(records) if r["skill"] == skill]
        rows.append(gates[idx].mean(0).tolist() if idx else [float("nan")] * gates.shape[1])
    return rows

_ROUTER_FIELDS = ("router_input", "router_head", "router_layer", "router_hidden", "gating", "threshold", "top_k",
                  "sparsity_weight", "balance_weight", "routing_loss_weight")

def _canonical(key: dict | None) -> dict | None:
    """A run's key with its config's fields filled in at their defaults (a run saved before a
    field existed ran as its default does), without the router settings of a model that has no
    router (LoReFT, the specialists): a change of the router's defaults does not change those runs."""
    config = (key or {}).get("config")
    if not config:
        return key
    try:
        config = CSReftConfig.from_dict(config).to_dict()
    except (TypeError, ValueError):  # not a config this version reads: compared as it is
        pass
    if not config.get("use_router", True):
        config = {k: v for k, v in config.items() if k not in _ROUTER_FIELDS}
    return {**key, "config": config}

def _evaluate(model, tokenizer, suite, opts, records) -> dict:
    res = evaluate_suite(model, tokenizer, suite, "test", records=records, batch_size=opts.eval_batch_size)
    if suite.composed and opts.eval_split == "test":
        comp = evaluate_suite(model, tokenizer, suite, "composed", batch_size=opts.eval_batch_size)
        res["composed_accuracy"], res["composed_correct"] = comp["micro_accuracy"], comp["correct"]
        res["seconds"] += comp["seconds"]
    return res

def _groups(records) -> dict[str, list[int]]:
    """Record indices by their "group" field (the paraphrase suite's seen / unseen phrasings)."""
    out = {}
    for i, r in enumerate(records):
        if r.get("group") is not None:
            out.setdefault(r["group"], []).append(i)
    return out

def _step_seconds(model, batch, opt) -> float:
    """Wall seconds of one training step: forward, backward, optimizer."""
    t = time.time()
    model(**batch, full_logits=False).loss.backward()
    opt.step()
    opt.zero_grad()
    return time.time() - t


def _calibrate_steps(base, tokenizer, suite, config, opts, budget_s: float, n_train_runs: int) -> tuple[int, dict]:
    """(steps per run that fit `budget_s` seconds of training, {threads: seconds per step}),
    from timed steps. Unless OMP_NUM_THREADS is set, the steps are timed on torch's threads and
    on one, and one thread is kept if it is 10% faster: where another job holds a core, torch's threads
    wait on each other at every operation, and one thread can be the faster (3.0 s against 4.4
    to 9.1 s per step here, both cores busy)."""
    model = get_csreft_model(base, config)
    data = SupervisedDataset(suite.train[: opts.batch_size], tokenizer, opts.max_length)
    batch = Collator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    for statistics_only in ("answer_mask", "skill_ids"):  # what the trainer logs, not model inputs
        batch.pop(statistics_only, None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    counts = [torch.get_num_threads()]
    if counts[0] > 1 and "OMP_NUM_THREADS" not in os.environ:
        counts.append(1)
    _step_seconds(model, batch, opt)  # warm-up: first-call allocations
    per_step = {}
    for n in counts:
        torch.set_num_threads(n)
        per_step[n] = min(_step_seconds(model, batch, opt) for _ in range(2))
    threads = counts[-1] if per_step[counts[-1]] < 0.9 * per_step[counts[0]] else counts[0]  # not on noise
    torch.set_num_threads(threads)
    model.remove_hooks()
    return max(5, int(budget_s / max(n_train_runs, 1) / per_step[threads])), per_step

class _Runner:
    """Trains and scores one method at one learning rate and seed; reuses identical runs."""

    def __init__(self, base, tokenizer, suite, opts, configs, stages, val):
        self.base, self.tokenizer, self.suite, self.opts = base, tokenizer, suite, opts
        self.configs, self.stages, self.params, self.val = configs, stages, {}, val

    def curve(self, model, wanted: bool) -> _Curve | None:
        """--eval-every: the run's learning curve on the validation records."""
        if not (wanted and self.opts.eval_every):
            return None

        def score() -> dict:
            model.eval()
            try:
                return evaluate_suite(model, self.tokenizer, self.suite, "test", records=self.val,
                                      batch_size=self.opts.eval_batch_size)
            finally:
                model.train()

        return _Curve(self.opts.eval_every, score)

    def config(self, method: Method) -> CSReftConfig:
        if method.label in self.configs:  # csreft variants, loreft[rank=...], specialists[rank=...]
            return self.configs[method.label]
        return self.configs["loreft"]  # specialists: one LoReFT per skill, LoReFT's rank

    def _finished(self, method: Method, run_dir: Path, key: dict) -> dict | None:
        """The saved result of a run with the same settings, or None."""
        saved = run_dir / "result.json"
        if saved.is_file():
            old = json.loads(saved.read_text())
            if _canonical(old.get("key")) == _canonical(key):
                self.params[method.label] = old.get("parameters", 0)
                return old
        return None

    def run(self, method: Method, lr, seed, stream, eval_records, run_dir: Path, key: dict, name: str, what: str,
            steps: int, curve: bool = False) -> dict | None:
        """Announces the run `name` (`what` it does, `steps` for the ETA) and returns its result: the saved one of
        a run with the same settings if there is one; None under --report-only when there is none."""
        old = self._finished(method, run_dir, key)
        if self.opts.report_only:
            return old
        self.stages.begin(name, what, steps, run_dir if old is not None else None)
        if old is not None:
            return old
        t = time.time()
        res = self._fresh(method, lr, seed, stream, eval_records, run_dir, key, curve)
        self.stages.ran(steps, time.time() - t)
        return res

    def _fresh(self, method: Method, lr, seed, stream, eval_records, run_dir: Path, key: dict, curve: bool) -> dict:
        shutil.rmtree(run_dir, ignore_errors=True)  # another run's logs and results, not to be appended to
        set_seed(seed)
        base, tokenizer, suite, opts = self.base, self.tokenizer, self.suite, self.opts
        if method.kind == "base":
            res = {**_evaluate(base, tokenizer, suite, opts, eval_records), "train_seconds": 0.0, "parameters": 0}
        elif method.kind == "specialists":
            res = _specialists(base, tokenizer, suite, self.config(method), stream, eval_records, opts, seed, run_dir, lr)
        elif method.kind in ("lora", "lora_edits"):
            from peft import LoraConfig, get_peft_model

            target = self.lora_target(method.kind)
            rank = lora_rank_for(base, target)
            model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            points = self.curve(model, curve)
            train_s = _train(model, tokenizer, stream, opts, seed, run_dir, lr, lora=True, curve=points)
            res = {**_evaluate(model, tokenizer, suite, opts, eval_records), "train_seconds": train_s,
                   "lora_rank": rank, "parameters": n}
            if points:
                res["curve"] = points.points
            self.base = model.unload()
        else:
            model = get_csreft_model(base, self.config(method))
            counts = model.trainable_parameters()
            supervised = method.kind == "csreft_supervised"
            points = self.curve(model, curve)
            train_s = _train(model, tokenizer, stream, opts, seed, run_dir, lr, suite.skills, supervised, curve=points)
            res = {**_evaluate(model, tokenizer, suite, opts, eval_records), "train_seconds": train_s,
                   "parameters": counts["total"], "edit_parameters": counts["edits"]}
            if points:
                res["curve"] = points.points
            if model.router is not None:
                gates = route_records(model, tokenizer, eval_records, opts.eval_batch_size)
                res["gates"] = gate_table(gates, eval_records, suite.skills)
                res["routing"] = routing_nmi(gates, [r["skill"] for r in eval_records])
                for group, idx in _groups(eval_records).items():
                    res.setdefault("by_group", {}).setdefault(group, {})["routing"] = routing_nmi(
                        gates[idx], [eval_records[i]["skill"] for i in idx])
            model.remove_hooks()
        self.base.eval()
        for group, idx in _groups(eval_records).items():  # e.g. seen / unseen phrasings (paraphrase suite)
            scored = [res["correct"][i] for i in idx if res["correct"][i] is not None]
            res.setdefault("by_group", {}).setdefault(group, {})["micro_accuracy"] = sum(scored) / max(len(scored), 1)
        res["key"], res["lr"] = key, lr
        run_dir.mkdir(parents=True, exist_ok=True)  # per-example results, for tests of one's own
        (run_dir / "result.json").write_text(json.dumps(res))
        self.params[method.label] = res.get("parameters", 0)
        return res

    def lora_target(self, kind: str) -> int:
        """CS-ReFT's total (lora) or edit (lora_edits) parameter count, default configuration."""
        model = get_csreft_model(self.base, self.configs["csreft"])
        counts = model.trainable_parameters()
        model.remove_hooks()
        return counts["total"] if kind == "lora" else counts["edits"]

def compare(opts: CompareOptions) -> dict:
    """Run the comparison; returns the report (also written to opts.output_dir). --max-minutes
    may train on fewer threads (see _calibrate_steps); torch's thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        return _compare(opts)
    finally:
        torch.set_num_threads(threads)


def _compare(opts: CompareOptions) -> dict:
    from ..base_models import DEFAULT_MODEL, load_base
    from ..evaluation.suites import get_suite

    started = time.time()
    if not opts.quiet:  # the stage lines say what runs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = parse_methods(opts.methods)
    if opts.train or opts.test:  # your own data: a suite named after a digest of its records
        suite = get_suite("files", train=opts.train, test=opts.test, train_per_skill=opts.train_per_skill,
                          test_per_skill=opts.test_per_skill)
        opts = dataclasses.replace(opts, suite=suite.name)
    else:
        suite = get_suite(opts.suite, train_per_skill=opts.train_per_skill, test_per_skill=opts.test_per_skill,
                          **({"composed": opts.composed} if opts.suite in ("builtin", "grid") else {}))
    pool, val = split_validation(suite, opts.val_per_skill)
    eval_records = suite.test if opts.eval_split == "test" else val
    base, tokenizer = load_base(opts.model or DEFAULT_MODEL)
    d = base.config.hidden_size
    k = opts.num_subspaces or len(suite.skills)
    common = dict(layers=list(opts.layers), rank=opts.rank, positions=opts.positions)
    default = {"num_subspaces": k, **{f: getattr(opts, f) for f in ("router_hidden", "sparsity_weight")
                                      if getattr(opts, f) is not None}}
    configs = {"csreft": CSReftConfig(**common, **default)}
    for m in methods:
        if m.kind in ROUTED:
            configs[m.label] = CSReftConfig(**common, **{**default, **m.config_overrides})
            configs[m.label].validate(hidden_size=d)
    shared = configs["csreft"].shared_subspaces
    configs["loreft"] = CSReftConfig(**{**common, "rank": opts.rank * (k + shared)}, num_subspaces=1, use_router=False)
    for m in methods:  # e.g. specialists[rank=4]: a specialist at one CS-ReFT subspace's capacity
        if m.kind in SINGLE_EDIT and "rank" in m.overrides:
            configs[m.label] = CSReftConfig(**{**common, "rank": m.overrides["rank"]}, num_subspaces=1, use_router=False)
            configs[m.label].validate(hidden_size=d)
    configs["csreft"].validate(hidden_size=d)

    max_steps = opts.max_steps
    trained = [m for m in methods if m.kind != "base"]
    to_select = [] if opts.lr is not None else [m for m in trained if m.lr is None]
    if any(m.kind == "specialists" for m in to_select) and not any(m.kind == "loreft" for m in to_select):
        to_select.insert(0, Method("loreft", "loreft"))  # specialists use LoReFT's learning rate
    to_select = [m for m in to_select if m.kind != "specialists"]
    grid = {m.label: (opts.lr_grid_lora if m.kind.startswith("lora") else opts.lr_grid_reft) for m in to_select}
    n_select = sum(len(g) for g in grid.values())
    calibrated = None
    if opts.max_minutes is not None:  # runs of max_steps, selection runs of half as many
        eval_s = 30.0 * len(eval_records) / 120
        budget = opts.max_minutes * 60 - (1 + opts.seeds * len(trained) + n_select) * eval_s * 1.1
        n_runs = opts.seeds * (len(trained) + sum(m.kind == "specialists" for m in trained)) + n_select / 2
        steps, per_step = _calibrate_steps(base, tokenizer, suite, configs["csreft"], opts, max(budget, 0) * 0.85, n_runs)
        max_steps = steps if opts.max_steps is None else min(steps, opts.max_steps)
        def threads(n: int) -> str:
            return f"{n} thread{'s' * (n > 1)}"

        timed = ", ".join(f"{s:.2f} s on {threads(n)}" for n, s in per_step.items())
        calibrated = f"--max-minutes {opts.max_minutes:g}: {max_steps} steps per run (a step took {timed}; " \
                     f"training on {threads(torch.get_num_threads())})"
    select_steps = opts.select_steps or max(1, max_steps // 2)
    n_seen = max_steps * opts.batch_size

    # specialists: k runs of about max_steps / k steps at the smaller batch, so about one joint run's time
    total = n_select * select_steps + opts.seeds * len(trained) * max_steps
    stages = Stages(total, opts.quiet)
    if calibrated:
        stages.say(calibrated)
    runner = _Runner(base, tokenizer, suite, opts, configs, stages, val)
    shared_key = {"suite": opts.suite, "train_per_skill": opts.train_per_skill, "test_per_skill": opts.test_per_skill,
                  "val_per_skill": opts.val_per_skill, "composed": opts.composed, "batch_size": opts.batch_size,
                  "max_length": opts.max_length,
                  "model": opts.model or DEFAULT_MODEL}

    def key_for(m: Method, lr, seed, steps, split):
        if m.kind == "base":
            cfg = None
        elif m.kind.startswith("lora"):  # a LoRA run depends on its rank alone
            cfg = {"lora_rank": lora_rank_for(runner.base, runner.lora_target(m.kind))}
        else:
            cfg = runner.config(m).to_dict()
        return {**shared_key, "method": m.label, "config": cfg, "lr": lr, "seed": seed, "steps": steps,
                "split": split, "specialist_batch_size": opts.specialist_batch_size if m.kind == "specialists" else None}

    # 1. learning rates, on the validation split (seed 0, select_steps steps)
    selection: dict[str, dict] = {}
    sel_stream = training_stream(pool, select_steps * opts.batch_size, 0)
    for m in to_select:
        scores = {}
        for lr in grid[m.label]:
            run_dir, key = out / "selection" / f"{_slug(m.label)}-lr{lr:g}", key_for(m, lr, 0, select_steps, "validation")
            res = runner.run(m, lr, 0, sel_stream, val, run_dir, key, f"selecting lr for {m.label}, lr {lr:g}",
                             f"{select_steps} steps, scored on {len(val)} validation records", select_steps)
            if res is not None:
                scores[lr] = res["accuracy"]
        if not scores:  # report_only, nothing selected yet
            continue
        best = max(scores.items(), key=lambda kv: (kv[1], -kv[0]))  # ties: the smaller lr
        selection[m.label] = {"grid": list(grid[m.label]), "validation_accuracy": {str(a): b for a, b in scores.items()},
                              "lr": best[0], "steps": select_steps}
        stages.say(f"{m.label}: lr {best[0]:g} (validation accuracy {100 * best[1]:.1f}%)")

    def lr_of(m: Method) -> float:
        if m.lr is not None:
            return float(m.lr)
        if opts.lr is not None:
            return opts.lr
        chosen = selection.get("loreft" if m.kind == "specialists" else m.label)
        return chosen["lr"] if chosen else None

    # 2. final runs: every seed, the selected learning rate, scored on eval_split
    runs: dict[str, list[dict]] = {m.label: [] for m in methods}
    report = None
    for seed in range(opts.seeds):
        stream = training_stream(pool, n_seen, seed)
        for m in methods:
            if m.kind == "base" and seed:  # frozen and scored greedily: seed 0's answers are every seed's
                continue
            lr = None if m.kind == "base" else lr_of(m)
            if m.kind != "base" and lr is None:  # report_only: no learning rate chosen yet
                continue
            steps = 0 if m.kind == "base" else max_steps
            what = f"training {steps} steps at lr {lr:g}, then scoring" if steps else "scoring the frozen base on"
            run_dir, key = out / "runs" / f"{_slug(m.label)}-seed{seed}", key_for(m, lr, seed, max_steps, opts.eval_split)
            if opts.eval_every and m.kind not in ("base", "specialists"):  # a run without its curve is redone
                key["eval_every"] = opts.eval_every
            res = runner.run(m, lr, seed, stream, eval_records, run_dir, key, f"{m.label}, seed {seed}",
                             f"{what} {len(eval_records)} {opts.eval_split} records", steps, curve=True)
            if res is None:  # report_only: this run is not there
                stages.say(f"{m.label}, seed {seed}: not in {out}, left out of the report")
                continue
            if "gates" in res:
                plot_gates(res["gates"], suite.skills, out / f"gates-{_slug(m.label)}-seed{seed}.png",
                           f"{m.label}, seed {seed}: mean gate per skill")
            runs[m.label].append(res)
            report = write_report(out, suite, runs, runner.params, base, opts, max_steps, time.time() - started,
                                  {name: c.to_dict() for name, c in configs.items()},
                                  {m.label: m.kind for m in methods}, selection)
    if report is None:
        raise ValueError(f"no finished run of these methods in {out}" if opts.report_only else "nothing was run")
    return report

def _specialists(base, tokenizer, suite, config, stream, eval_records, opts, seed, run_dir, lr) -> dict:
    """One LoReFT per skill on that skill's share of the joint stream; scored on its own skill."""
    merged = {"correct": [None] * len(eval_records), "train_seconds": 0.0, "seconds": 0.0, "per_skill": {},
              "parameters": 0, "examples_per_skill": {}}
    for skill in suite.skills:
        records = [r for r in stream if r["skill"] == skill]
        test_idx = [i for i, r in enumerate(eval_records) if r["skill"] == skill]
        merged["examples_per_skill"][skill] = len(records)
        if not test_idx:
            continue
        model = get_csreft_model(base, config)  # with no examples of its skill it stays the base
        merged["parameters"] += model.trainable_parameters()["total"]
        if records:
            merged["train_seconds"] += _train(model, tokenizer, records, opts, seed, run_dir / skill, lr,
                                              batch_size=opts.specialist_batch_size)
        res = evaluate_suite(model, tokenizer, suite, "test", records=[eval_records[i] for i in test_idx],
                             batch_size=opts.eval_batch_size)
        model.remove_hooks()
        merged["seconds"] += res["seconds"]
        merged["per_skill"][skill] = res["per_skill"][skill]
        for i, c in zip(test_idx, res["correct"]):
            merged["correct"][i] = c
    scored = [c for c in merged["correct"] if c is not None]
    merged["accuracy"] = statistics.mean(v["accuracy"] for v in merged["per_skill"].values())
    merged["micro_accuracy"] = sum(scored) / len(scored)
    return merged
