"""Comparison runner: does CS-ReFT reduce interference between skills?

On one suite, with the same data order, seed and step budget, it trains and scores:
  base         the frozen model, no training;
  loreft       one LoReFT edit (k = 1, no router) of rank k*r: the same edit parameters;
  specialists  one LoReFT per skill, trained on exactly the examples of that skill that the
               joint runs saw, in the same order: the no-interference reference. At the
               joint batch size a specialist takes about 1/k of the joint run's optimizer
               steps; specialist_batch_size ~ batch_size / k gives it about as many steps;
  csreft       k subspaces with a learned (unsupervised) router;
  csreft_supervised  the same, with the skill-supervised routing loss;
  lora         PEFT LoRA on q_proj and v_proj at about the same trainable-parameter count.
Interference of a joint method on a skill = specialist accuracy - joint accuracy. Paired tests
(McNemar, paired bootstrap) compare methods on the same test examples, pooled over seeds.
Writes report.json, report.md and one gate heatmap (skill x subspace) per CS-ReFT run.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

from .config import CSReftConfig
from .data import Collator, SupervisedDataset, encode_example, pad_batch, template_parts
from .evaluation import evaluate_suite, mcnemar, paired_bootstrap
from .model import get_csreft_model
from .train import DEFAULTS, CSReftTrainer, JsonlLogger, OrderedTrainer, answer_loss, training_arguments

METHODS = ("base", "loreft", "specialists", "csreft", "csreft_supervised", "lora")
JOINT = ("loreft", "csreft", "csreft_supervised", "lora")
PAIRS = (("csreft", "loreft"), ("csreft_supervised", "loreft"), ("csreft_supervised", "csreft"),
         ("csreft", "specialists"), ("loreft", "specialists"), ("csreft", "lora"), ("csreft", "base"))


@dataclass
class CompareOptions:
    suite: str = "builtin"
    methods: tuple = METHODS
    seeds: int = 3
    max_steps: int | None = 100  # None with max_minutes: sized to fit the time
    max_minutes: float | None = None
    batch_size: int = 8
    specialist_batch_size: int | None = None  # None: batch_size (same examples, 1/k of the steps)
    lr: float = 4e-3
    rank: int = 4
    num_subspaces: int | None = None  # None: one per skill
    layers: list = field(default_factory=lambda: [3, 9, 18, 24])
    positions: str = "f7+l7"
    router_hidden: int | None = None  # None: d/2 as in the paper
    sparsity_weight: float = 0.0
    max_length: int = 256
    train_per_skill: int | None = 100
    test_per_skill: int | None = 50
    composed: int = 60
    eval_batch_size: int = 16
    model: str | None = None
    output_dir: str = "runs/compare"


def training_stream(records: list[dict], n: int, seed: int) -> list[dict]:
    """The first n records of seeded shuffled passes over `records`: what a joint run sees."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        epoch = list(records)
        rng.shuffle(epoch)
        out += epoch
    return out[:n]


def _train(model, tokenizer, records, opts: CompareOptions, seed: int, out_dir: Path,
           skills=None, supervised=False, lora=False, batch_size: int | None = None) -> float:
    """Train on `records` in their order, one pass; returns wall seconds."""
    data = SupervisedDataset(records, tokenizer, opts.max_length, skills)
    batch_size = batch_size or opts.batch_size
    steps = math.ceil(len(data) / batch_size)
    args = training_arguments({**DEFAULTS, "output_dir": str(out_dir), "batch_size": batch_size,
                               "lr": opts.lr, "seed": seed, "max_steps": steps, "logging_steps": min(10, steps)})
    common = dict(model=model, args=args, train_dataset=data, shuffle=False,
                  callbacks=[JsonlLogger(out_dir / "log.jsonl")])
    if lora:
        trainer = _LoraTrainer(data_collator=_LoraCollator(tokenizer.pad_token_id), **common)
    else:
        trainer = CSReftTrainer(data_collator=Collator(tokenizer.pad_token_id, with_skills=supervised), **common)
    started = time.time()
    trainer.train()
    model.eval()
    return time.time() - started


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


def mean_gates(model, tokenizer, suite, records, batch_size: int) -> list[list[float]]:
    """Mean gate per (skill x subspace) over `records` (rows in suite.skills order)."""
    parts = template_parts(tokenizer)
    gates = []
    for i in range(0, len(records), batch_size):
        enc = [encode_example(tokenizer, r["prompt"], parts=parts) for r in records[i:i + batch_size]]
        b = pad_batch(enc, tokenizer.pad_token_id, side="left")
        device = next(model.parameters()).device
        gates.append(model.route(b["input_ids"].to(device), b["attention_mask"].to(device), b["prompt_starts"]).float().cpu())
    gates = torch.cat(gates)
    rows = []
    for skill in suite.skills:
        idx = [j for j, r in enumerate(records) if r["skill"] == skill]
        rows.append(gates[idx].mean(0).tolist() if idx else [float("nan")] * gates.shape[1])
    return rows


def plot_gates(matrix, skills, path: Path, title: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(matrix[0]), 1.0 + 0.45 * len(skills)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(matrix[0])), [f"s{i}" for i in range(len(matrix[0]))])
    ax.set_yticks(range(len(skills)), skills)
    for (i, j), v in np.ndenumerate(np.array(matrix)):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("subspace")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _evaluate(model, tokenizer, suite, opts) -> dict:
    res = evaluate_suite(model, tokenizer, suite, "test", batch_size=opts.eval_batch_size)
    if suite.composed:
        comp = evaluate_suite(model, tokenizer, suite, "composed", batch_size=opts.eval_batch_size)
        res["composed_accuracy"], res["composed_correct"] = comp["micro_accuracy"], comp["correct"]
        res["seconds"] += comp["seconds"]
    return res


def _calibrate_steps(base, tokenizer, suite, config, opts, budget_s: float, n_train_runs: int) -> int:
    """Steps per run that fit `budget_s` seconds of training, from two timed steps."""
    model = get_csreft_model(base, config)
    data = SupervisedDataset(suite.train[: opts.batch_size], tokenizer, opts.max_length)
    batch = Collator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    times = []
    for _ in range(2):
        t = time.time()
        model(**batch, full_logits=False).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - t)
    model.remove_hooks()
    per_step = min(times)
    return max(5, int(budget_s / max(n_train_runs, 1) / per_step))


def compare(opts: CompareOptions) -> dict:
    """Run the comparison; returns the report (also written to opts.output_dir)."""
    from .base_models import DEFAULT_MODEL, load_base
    from .suites import get_suite

    started = time.time()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = get_suite(opts.suite, train_per_skill=opts.train_per_skill, test_per_skill=opts.test_per_skill,
                      **({"composed": opts.composed} if opts.suite == "builtin" else {}))
    base, tokenizer = load_base(opts.model or DEFAULT_MODEL)
    d = base.config.hidden_size
    k = opts.num_subspaces or len(suite.skills)
    csreft_cfg = CSReftConfig(layers=list(opts.layers), rank=opts.rank, num_subspaces=k, positions=opts.positions,
                              router_hidden=opts.router_hidden, sparsity_weight=opts.sparsity_weight)
    loreft_cfg = CSReftConfig(layers=list(opts.layers), rank=opts.rank * k, num_subspaces=1,
                              positions=opts.positions, use_router=False)
    csreft_cfg.validate(hidden_size=d)
    methods = [m for m in METHODS if m in opts.methods]
    runs: dict[str, list[dict]] = {m: [] for m in methods}

    base_result = _evaluate(base, tokenizer, suite, opts) if "base" in methods else None
    max_steps = opts.max_steps
    if opts.max_minutes is not None:
        eval_s = base_result["seconds"] if base_result else 30.0
        trained = [m for m in methods if m != "base"]
        n_evals = opts.seeds * len(trained)
        budget = opts.max_minutes * 60 - (time.time() - started) - n_evals * eval_s * 1.1
        n_runs = opts.seeds * (len(trained) + (1 if "specialists" in trained else 0))
        steps = _calibrate_steps(base, tokenizer, suite, csreft_cfg, opts, max(budget, 0) * 0.85, n_runs)
        max_steps = steps if opts.max_steps is None else min(steps, opts.max_steps)
    n_seen = max_steps * opts.batch_size

    params = {}
    for seed in range(opts.seeds):
        stream = training_stream(suite.train, n_seen, seed)
        for method in methods:
            run_dir = out / "runs" / f"{method}-seed{seed}"
            set_seed(seed)
            if method == "base":
                res = {**base_result, "train_seconds": 0.0}
                params[method] = 0
            elif method == "specialists":
                res = _specialists(base, tokenizer, suite, loreft_cfg, stream, opts, seed, run_dir)
                params[method] = res.pop("parameters")
            elif method == "lora":
                from peft import LoraConfig, get_peft_model

                target = params.get("csreft") or _csreft_parameters(base, csreft_cfg)
                rank = lora_rank_for(base, target)
                model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
                params[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                train_s = _train(model, tokenizer, stream, opts, seed, run_dir, lora=True)
                res = {**_evaluate(model, tokenizer, suite, opts), "train_seconds": train_s, "lora_rank": rank}
                base = model.unload()
            else:
                config = loreft_cfg if method == "loreft" else csreft_cfg
                model = get_csreft_model(base, config)
                params[method] = model.trainable_parameters()["total"]
                supervised = method == "csreft_supervised"
                train_s = _train(model, tokenizer, stream, opts, seed, run_dir, suite.skills, supervised)
                res = {**_evaluate(model, tokenizer, suite, opts), "train_seconds": train_s}
                if method.startswith("csreft"):
                    res["gates"] = mean_gates(model, tokenizer, suite, suite.test, opts.eval_batch_size)
                    plot_gates(res["gates"], suite.skills, out / f"gates-{method}-seed{seed}.png",
                               f"{method}, seed {seed}: mean gate per skill")
                model.remove_hooks()
            base.eval()
            runs[method].append(res)
            run_dir.mkdir(parents=True, exist_ok=True)  # per-example results, for tests of one's own
            (run_dir / "result.json").write_text(json.dumps(res))
            report = write_report(out, suite, runs, params, base, opts, max_steps, time.time() - started,
                                  {"csreft": csreft_cfg.to_dict(), "loreft": loreft_cfg.to_dict()})
    return report


def write_report(out: Path, suite, runs, *args) -> dict:
    """Write report.json and report.md from the runs finished so far (after every run, so an
    interrupted comparison still leaves its results)."""
    report = build_report(suite, {m: r for m, r in runs.items() if r}, *args)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report))
    return report


def _csreft_parameters(base, config) -> int:
    model = get_csreft_model(base, config)
    n = model.trainable_parameters()["total"]
    model.remove_hooks()
    return n


def _specialists(base, tokenizer, suite, config, stream, opts, seed, run_dir) -> dict:
    """One LoReFT per skill on that skill's share of the joint stream; scored on its own skill."""
    merged = {"correct": [None] * len(suite.test), "train_seconds": 0.0, "seconds": 0.0, "per_skill": {},
              "parameters": 0, "examples_per_skill": {}}
    for skill in suite.skills:
        records = [r for r in stream if r["skill"] == skill]
        test_idx = [i for i, r in enumerate(suite.test) if r["skill"] == skill]
        merged["examples_per_skill"][skill] = len(records)
        if not test_idx:
            continue
        model = get_csreft_model(base, config)  # with no examples of its skill it stays the base
        merged["parameters"] += model.trainable_parameters()["total"]
        if records:
            merged["train_seconds"] += _train(model, tokenizer, records, opts, seed, run_dir / skill,
                                              batch_size=opts.specialist_batch_size)
        res = evaluate_suite(model, tokenizer, suite, "test", records=[suite.test[i] for i in test_idx],
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


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_report(suite, runs, params, base, opts, max_steps, wall, configs) -> dict:
    base_params = sum(p.numel() for p in base.parameters())
    methods = {}
    for method, results in runs.items():
        per_skill = {s: _mean_sd([r["per_skill"][s]["accuracy"] for r in results if s in r["per_skill"]])
                     for s in suite.skills}
        methods[method] = {
            "per_skill": {s: {"mean": m, "sd": sd} for s, (m, sd) in per_skill.items()},
            "accuracy": dict(zip(("mean", "sd"), _mean_sd([r["accuracy"] for r in results]))),
            "composed_accuracy": dict(zip(("mean", "sd"), _mean_sd([r.get("composed_accuracy") for r in results]))),
            "trainable_parameters": params.get(method, 0),
            "percent_of_base": 100.0 * params.get(method, 0) / base_params,
            "train_seconds": statistics.mean(r["train_seconds"] for r in results),
            "eval_seconds": statistics.mean(r["seconds"] for r in results),
            "per_seed_accuracy": [r["accuracy"] for r in results],
            "gates": [r["gates"] for r in results if "gates" in r],
            "lora_rank": results[0].get("lora_rank"),
            "examples_per_skill": [r["examples_per_skill"] for r in results if "examples_per_skill" in r],
        }
    interference = {}
    if "specialists" in methods:
        spec = methods["specialists"]["per_skill"]
        for method in (m for m in JOINT if m in methods):
            diffs = {s: spec[s]["mean"] - methods[method]["per_skill"][s]["mean"]
                     for s in suite.skills if spec[s]["mean"] is not None}
            interference[method] = {"per_skill": diffs, "mean": statistics.mean(diffs.values()) if diffs else None}
    tests = []
    for a, b in PAIRS:
        if a in runs and b in runs:
            ca = [c for r in runs[a] for c in r["correct"]]
            cb = [c for r in runs[b] for c in r["correct"]]
            keep = [i for i, (x, y) in enumerate(zip(ca, cb)) if x is not None and y is not None]
            ca, cb = [ca[i] for i in keep], [cb[i] for i in keep]
            diff, lo, hi = paired_bootstrap(ca, cb, n=2000, seed=0)
            tests.append({"a": a, "b": b, "n": len(ca), "accuracy_difference": diff, "ci95": [lo, hi],
                          "mcnemar_p": mcnemar(ca, cb)})
    return {
        "suite": suite.name, "skills": suite.skills, "suite_info": suite.info,
        "sizes": {"train": len(suite.train), "test": len(suite.test), "composed": len(suite.composed)},
        "seeds": list(range(opts.seeds)), "max_steps": max_steps, "batch_size": opts.batch_size,
        "specialist_batch_size": opts.specialist_batch_size or opts.batch_size,
        "examples_seen_per_joint_run": max_steps * opts.batch_size,
        "methods": methods, "interference": interference, "paired_tests": tests,
        "configs": configs, "options": asdict(opts), "wall_seconds": wall, "base_parameters": base_params,
        "model": opts.model or "smollm2-135m-instruct",
    }


def _fmt(mean, sd=None, pct=True):
    if mean is None:
        return "n/a"
    scale = 100 if pct else 1
    return f"{mean * scale:.1f}" + (f" ± {sd * scale:.1f}" if sd else "")


def render_markdown(r: dict) -> str:
    skills = r["skills"]
    lines = [
        f"# CS-ReFT comparison: {r['suite']} suite",
        "",
        f"Model {r['model']}; {r['sizes']['train']} train / {r['sizes']['test']} test / "
        f"{r['sizes']['composed']} composed records; seeds {r['seeds']}; {r['max_steps']} steps x batch "
        f"{r['batch_size']} = {r['examples_seen_per_joint_run']} examples per joint run; wall time "
        f"{r['wall_seconds'] / 60:.1f} min. Accuracy in % (mean ± sd over seeds).",
        "",
        "| method | " + " | ".join(skills) + " | mean | composed | trainable | PE% | train s | eval s |",
        "|---" * (len(skills) + 7) + "|",
    ]
    for name, m in r["methods"].items():
        cells = [_fmt(m["per_skill"][s]["mean"], m["per_skill"][s]["sd"]) for s in skills]
        label = name + (f" (r={m['lora_rank']})" if m.get("lora_rank") else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(m['accuracy']['mean'], m['accuracy']['sd'])} | "
                     f"{_fmt(m['composed_accuracy']['mean'])} | {m['trainable_parameters']:,} | "
                     f"{m['percent_of_base']:.4f} | {m['train_seconds']:.0f} | {m['eval_seconds']:.0f} |")
    if r["interference"]:
        lines += ["", "Interference = specialist accuracy - joint accuracy (points; positive = the joint "
                  "run lost accuracy to sharing).", "",
                  "| method | " + " | ".join(skills) + " | mean |", "|---" * (len(skills) + 2) + "|"]
        for name, v in r["interference"].items():
            cells = [f"{v['per_skill'][s] * 100:+.1f}" if s in v["per_skill"] else "n/a" for s in skills]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {v['mean'] * 100:+.1f} |")
        seen = r["methods"]["specialists"]["examples_per_skill"]
        if seen:
            per = {s: statistics.mean(e[s] for e in seen) for s in skills}
            bs = r.get("specialist_batch_size", r["batch_size"])
            lines += ["", f"Each specialist saw its skill's share of the joint stream, at batch size {bs}: " +
                      ", ".join(f"{s} {n:.0f} examples ({math.ceil(n / bs)} steps)" for s, n in per.items()) + "."]
    if r["paired_tests"]:
        lines += ["", "Paired tests on the same test examples, pooled over seeds (difference = a - b).", "",
                  "| a | b | n | difference (95% CI) | McNemar p |", "|---|---|---|---|---|"]
        for t in r["paired_tests"]:
            lines.append(f"| {t['a']} | {t['b']} | {t['n']} | {t['accuracy_difference'] * 100:+.1f} "
                         f"({t['ci95'][0] * 100:+.1f}, {t['ci95'][1] * 100:+.1f}) | {t['mcnemar_p']:.3g} |")
    gates = [f"gates-{m}-seed{s}.png" for m, v in r["methods"].items() if m.startswith("csreft")
             for s in r["seeds"][:len(v["gates"])]]
    if gates:
        lines += ["", "Gate heatmaps (mean gate per skill x subspace on the test set): " + ", ".join(gates)]
    lines += ["", "Configurations:", "", "```json", json.dumps(r["configs"], indent=1), "```", ""]
    return "\n".join(lines)
