#!/usr/bin/env python
"""Does CS-ReFT compose skills? Composed accuracy on the built-in suite's two-skill prompts.

    python benchmarks/composition.py [--model NAME] [--output-dir runs/composition]
        [--train-per-skill 60 --test-per-skill 20 --composed 30] [--steps 300]
        [--specialist-steps 100 --router-steps 100] [--removal-skills all|sort,upper]

Trains, on the suite's single-skill training records (composed prompts are never trained on):
  supervised  one CS-ReFT adapter, k = 6, supervised routing (--skill-routing);
  specialists one LoReFT adapter per skill, each on that skill's records alone, composed into
              a library (csreft compose) whose fresh router is then trained alone
              (--train router, supervised routing; the imported edits stay bit-identical).
Then scores, by exact match of greedy outputs:
  learned router        each model routes by itself (test and composed records);
  explicit union        gates = the composed record's two component skills (skills=[a, b]);
  removal               supervised adapter, router gates with one skill's gate set to 0 or -1:
                        accuracy on that skill's test records and on the other skills'.
Writes OUTPUT_DIR/composition.json (everything, per-record outputs and step times) and
OUTPUT_DIR/composition.md (the table). --model takes any base csreft.load_base reads
(default SmolLM2-135M-Instruct); the test runs it on a tiny random model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from csreft import CSReftModel, load_base  # noqa: E402
from csreft.compose import compose_to_directory  # noqa: E402
from csreft.data import encode_example, pad_batch, template_parts  # noqa: E402
from csreft.generation import generate_texts  # noqa: E402
from csreft.suites import builtin_suite  # noqa: E402
from csreft.train import run as train_run  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: csreft.DEFAULT_MODEL)")
    p.add_argument("--output-dir", default="runs/composition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-skill", type=int, default=60)
    p.add_argument("--test-per-skill", type=int, default=20)
    p.add_argument("--composed", type=int, default=30, help="composed records, split over the 3 tasks")
    p.add_argument("--steps", type=int, default=300, help="training steps of the supervised CS-ReFT adapter")
    p.add_argument("--specialist-steps", type=int, default=100, help="training steps of each specialist")
    p.add_argument("--router-steps", type=int, default=100, help="router-only training steps of the library")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers", default="3,9,18,24")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--positions", default="f7+l7")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest answer + 8 tokens")
    p.add_argument("--removal-skills", default="all", help="skills whose gate is zeroed / negated ('all' or a,b)")
    return p.parse_args(argv)


class Timer:
    def __init__(self):
        self.seconds = {}

    def __call__(self, name, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t, 2)
        print(f"[composition] {name}: {self.seconds[name]:.1f} s", file=sys.stderr)
        return out


def write_jsonl(path: Path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def train(args, out: Path, data: str, steps: int, **options) -> Path:
    """Train with the csreft recipe; returns the adapter directory."""
    opts = dict(model=args.model, data=data, output_dir=str(out), max_steps=steps, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, logging_steps=max(1, steps // 10), max_length=args.max_length,
                layers=args.layers, rank=args.rank, positions=args.positions)
    train_run({**opts, **options})  # None: not given (an --init-adapter run keeps the adapter's)
    return out / "adapter"


def score(suite, model, tokenizer, records, max_new_tokens, gates=None, skills=None) -> dict:
    """Exact-match accuracy per task (record["skill"]) and overall (mean over tasks)."""
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records) + 8
    outputs = generate_texts(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                             gates=gates, skills=skills)
    correct = [bool(suite.check(r, o)) for r, o in zip(records, outputs)]
    per_task = {}
    for r, c in zip(records, correct):
        t = per_task.setdefault(r["skill"], {"n": 0, "correct": 0})
        t["n"], t["correct"] = t["n"] + 1, t["correct"] + c
    for t in per_task.values():
        t["accuracy"] = t["correct"] / t["n"]
    mean = sum(t["accuracy"] for t in per_task.values()) / max(1, len(per_task))
    return {"accuracy": mean, "per_task": per_task, "outputs": outputs, "correct": correct}


@torch.no_grad()
def router_gates(model, tokenizer, prompts, batch_size=8) -> torch.Tensor:
    """The router's gates (N, k) for plain prompts, templated as generate_texts does."""
    parts = template_parts(tokenizer, None)
    encoded = [encode_example(tokenizer, p, parts=parts) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[i:i + batch_size], pad, side="left")
        out.append(model.route(batch["input_ids"], batch["attention_mask"], prompt_starts=batch["prompt_starts"]).cpu())
    return torch.cat(out)


def removal(suite, model, tokenizer, test, skills, args) -> dict:
    """Router gates with skill s set to 0 or -1: accuracy on s's test records and the others'."""
    routed = router_gates(model, tokenizer, [r["prompt"] for r in test])
    base = score(suite, model, tokenizer, test, args.max_new_tokens, gates=routed)
    out = {}
    for s in skills:
        j = model.skill_names.index(s)
        own = [i for i, r in enumerate(test) if r["skill"] == s]
        rest = [i for i, r in enumerate(test) if r["skill"] != s]
        row = {"router": {"own": _mean(base["correct"], own), "others": _mean(base["correct"], rest)}}
        for value in (0.0, -1.0):
            gates = routed.clone()
            gates[:, j] = value
            res = score(suite, model, tokenizer, test, args.max_new_tokens, gates=gates)
            row[f"gate {value:g}"] = {"own": _mean(res["correct"], own), "others": _mean(res["correct"], rest)}
        out[s] = row
    return out


def _mean(correct, idx):
    return sum(correct[i] for i in idx) / len(idx) if idx else float("nan")


def table(results: dict, tasks: list[str]) -> str:
    lines = ["| model | gates | test (mean over skills) | composed (mean) | " + " | ".join(tasks) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for name, r in results["rows"].items():
        comp = r.get("composed")
        cells = [f"{comp['per_task'][t]['correct']}/{comp['per_task'][t]['n']}" if comp else "-" for t in tasks]
        test = f"{r['test']['accuracy']:.3f}" if r.get("test") else "-"
        mean = f"{comp['accuracy']:.3f}" if comp else "-"
        lines.append(f"| {r['model']} | {r['gates']} | {test} | {mean} | " + " | ".join(cells) + " |")
    lines += ["", "Exact match of greedy outputs. Test records under explicit gates get their own skill's "
              "gate alone; composed records get both component skills' gates."]
    lines += ["", "Removal (supervised CS-ReFT; router gates with one skill's gate replaced):", "",
              "| skill | own: router | own: gate 0 | own: gate -1 | others: router | others: gate 0 | others: gate -1 |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s, row in results["removal"].items():
        cells = [row[k][who] for who in ("own", "others") for k in ("router", "gate 0", "gate -1")]
        lines.append(f"| {s} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    timer = Timer()
    suite = builtin_suite(args.seed, args.train_per_skill, args.test_per_skill, args.composed)
    skills = sorted(suite.skills)
    data = write_jsonl(out / "data" / "train.jsonl", suite.train)

    supervised = timer("train supervised CS-ReFT", train, args, out / "supervised", data, args.steps,
                       num_subspaces=len(skills), skill_routing=True)
    specialists = []
    for s in skills:
        own = write_jsonl(out / "data" / f"train-{s}.jsonl", [r for r in suite.train if r["skill"] == s])
        specialists.append(timer(f"train specialist {s}", train, args, out / "specialists" / s, own,
                                 args.specialist_steps, num_subspaces=1, use_router=False))
    base, tokenizer = load_base(args.model) if args.model else load_base()
    timer("compose library", compose_to_directory, base, specialists, out / "library", seed=args.seed).remove_hooks()
    routed_library = timer("train library router", train, args, out / "library-router", data, args.router_steps,
                           init_adapter=str(out / "library"), train="router", skill_routing=True,
                           layers=None, rank=None, positions=None)

    test, composed = suite.test, suite.composed
    union = [r["skills"] for r in composed]
    results = {"args": vars(args), "skills": skills, "rows": {}, "seconds": timer.seconds}

    def evaluate(name, model_label, gates_label, model, test_kw=None, composed_kw=None):
        row = {"model": model_label, "gates": gates_label}
        if test_kw is not None:
            row["test"] = timer(f"score {name} test", score, suite, model, tokenizer, test, args.max_new_tokens, **test_kw)
        if composed_kw is not None:
            row["composed"] = timer(f"score {name} composed", score, suite, model, tokenizer, composed,
                                    args.max_new_tokens, **composed_kw)
        results["rows"][name] = row

    evaluate("base", "base model", "-", base, {}, {})
    model = CSReftModel.from_pretrained(base, supervised)
    evaluate("supervised-router", "CS-ReFT, supervised routing", "learned router", model, {}, {})
    evaluate("supervised-union", "CS-ReFT, supervised routing", "explicit union of the 2 skills", model,
             {"skills": [[r["skill"]] for r in test]}, {"skills": union})
    chosen = skills if args.removal_skills == "all" else [s.strip() for s in args.removal_skills.split(",")]
    results["removal"] = timer("removal", removal, suite, model, tokenizer, test, chosen, args)
    model.remove_hooks()
    model = CSReftModel.from_pretrained(base, routed_library)
    evaluate("library-router", "library of 6 specialists", "router trained on top", model, {}, {})
    evaluate("library-union", "library of 6 specialists", "explicit union of the 2 skills", model,
             {"skills": [[r["skill"]] for r in test]}, {"skills": union})
    model.remove_hooks()

    tasks = list(dict.fromkeys(r["skill"] for r in composed))
    markdown = table(results, tasks)
    results["seconds"] = timer.seconds
    (out / "composition.json").write_text(json.dumps(results, indent=2))
    (out / "composition.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwritten: {out / 'composition.json'}, {out / 'composition.md'}")
    return results


if __name__ == "__main__":
    main()
