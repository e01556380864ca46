#!/usr/bin/env python
"""Does CS-ReFT compose skills? Composed accuracy on the built-in suite's two-skill prompts.

    python benchmarks/composition.py [--model NAME] [--output-dir runs/composition]
        [--train-per-skill 60 --test-per-skill 20 --composed 30] [--steps 300]
        [--specialist-steps 100 --router-steps 100] [--removal-skills all|sort,upper]
        [--union-gates 1,0.5] [--gate-grid 0.5,1,1.5 --composed-val 30] [--reuse]

Trains, on the suite's single-skill training records (composed prompts are never trained on):
  supervised  one CS-ReFT adapter, k = 6, supervised routing (--skill-routing);
  specialists one LoReFT adapter per skill, each on that skill's records alone, composed into
              a library (csreft compose) whose fresh router is then trained alone
              (--train router, supervised routing; the imported edits stay bit-identical).
Then scores, by exact match of greedy outputs:
  learned router        each model routes by itself (test and composed records);
  explicit union        gates = the composed record's two component skills, each at every
                        value of --union-gates (1: both edits whole, "add"; 0.5: their mean,
                        like an adapter average); test records get their own skill's gate alone;
  chosen union          per task, the pair of gates from --gate-grid x --gate-grid (0.5,1,1.5)
                        that scores best on --composed-val further composed records (inputs
                        unseen in training and not among the test ones), then scored on the test;
  removal               supervised adapter, router gates with one skill's gate set to 0 or -1:
                        accuracy on that skill's test records and on the other skills'.
Composed records are scored twice: exact match of the two-skill answer, and "one part": the
output is what one component skill alone gives (reverse+upper: the reversed word or the
upper-cased word; sentiment+upper: the label in lower case or the upper-cased sentence;
sort+reverse: the numbers sorted ascending or in reversed input order), which tells a union that
applies one skill from one that applies neither.
--reuse takes the adapters an earlier run with the same training arguments left in OUTPUT_DIR
(only the scoring runs again).
Writes OUTPUT_DIR/composition.json (everything, per-record outputs and step times) and
OUTPUT_DIR/composition.md (the table). --model takes any base csreft.load_base reads
(default SmolLM2-135M-Instruct); the test runs it on a tiny random model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from csreft import CSReftModel, load_base  # noqa: E402
from csreft.data import encode_example, pad_batch, template_parts  # noqa: E402
from csreft.generation import generate_texts  # noqa: E402
from csreft.evaluation.suites import builtin_suite, check_answer  # noqa: E402
from csreft.training.recipe import run as train_run  # noqa: E402


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
    p.add_argument("--union-gates", default="1,0.5", help="gate values of the explicit unions (comma-separated)")
    p.add_argument("--gate-grid", default="0.5,1,1.5", help="per-skill gate values tried on validation composed "
                   "records ('' to skip)")
    p.add_argument("--composed-val", type=int, default=30, help="validation composed records (other inputs)")
    p.add_argument("--reuse", action="store_true", help="reuse the adapters of an earlier run in OUTPUT_DIR "
                   "(its training arguments must be these)")
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


TRAINING_ARGS = ("model", "seed", "train_per_skill", "test_per_skill", "composed", "steps", "specialist_steps",
                 "router_steps", "batch_size", "lr", "layers", "rank", "positions", "max_length")


def check_reuse(args, out: Path) -> None:
    """Record the training arguments; with --reuse, refuse adapters trained with other ones."""
    ours = {k: getattr(args, k) for k in TRAINING_ARGS}
    saved_file = out / "training-args.json"
    if args.reuse and saved_file.exists():
        saved = json.loads(saved_file.read_text())
        diff = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in ours.items() if saved.get(k) != v]
        if diff:
            sys.exit(f"error: --reuse: {out} holds adapters trained with other arguments ({'; '.join(diff)})")
    out.mkdir(parents=True, exist_ok=True)
    saved_file.write_text(json.dumps(ours, indent=2))


def reusable(args, adapter: Path) -> bool:
    return args.reuse and (adapter / "csreft_config.json").exists()


def train(args, timer, name: str, out: Path, data: str, steps: int, **options) -> Path:
    """Train with the csreft recipe (or, with --reuse, take the adapter already there)."""
    if reusable(args, out / "adapter"):
        return out / "adapter"  # timer keeps the earlier run's training time
    opts = dict(model=args.model, data=data, output_dir=str(out), max_steps=steps, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, logging_steps=max(1, steps // 10), max_length=args.max_length,
                layers=args.layers, rank=args.rank, positions=args.positions)
    timer(name, train_run, {**opts, **options})  # None: not given (an --init-adapter run keeps the adapter's)
    return out / "adapter"


def component_answers(record: dict) -> list[tuple[str, str]]:
    """(answer, check kind) of each component skill alone on a composed record's input."""
    x, task = record["input"], record["skill"]
    if task == "reverse+upper":
        return [(x[::-1], "exact"), (x.upper(), "exact")]
    if task == "sentiment+upper":
        return [(record["response"].lower(), "exact"), (x.upper(), "exact")]
    if task == "sort+reverse":
        nums = x.split()
        return [(" ".join(sorted(nums, key=int)), "numbers"), (" ".join(reversed(nums)), "numbers")]
    raise ValueError(f"no component answers for composed task {task!r}")


def score(suite, model, tokenizer, records, max_new_tokens, gates=None, skills=None) -> dict:
    """Exact-match accuracy per task (record["skill"]) and overall (mean over tasks)."""
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records) + 8
    outputs = generate_texts(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                             gates=gates, skills=skills)
    correct = [bool(suite.check(r, o)) for r, o in zip(records, outputs)]
    composed = all("skills" in r for r in records)
    one_part = [composed and not c and any(check_answer(kind, answer, o) for answer, kind in component_answers(r))
                for r, o, c in zip(records, outputs, correct)]
    per_task = {}
    for r, c, part in zip(records, correct, one_part):
        t = per_task.setdefault(r["skill"], {"n": 0, "correct": 0, "one_part": 0})
        t["n"], t["correct"], t["one_part"] = t["n"] + 1, t["correct"] + c, t["one_part"] + part
    for t in per_task.values():
        t["accuracy"] = t["correct"] / t["n"]
    mean = sum(t["accuracy"] for t in per_task.values()) / max(1, len(per_task))
    result = {"accuracy": mean, "per_task": per_task, "outputs": outputs, "correct": correct}
    if composed:
        result["one_part"] = sum(one_part) / max(1, len(one_part))
    return result


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
    lines = ["| model | gates | test (mean over skills) | composed (mean) | one part only | "
             + " | ".join(tasks) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for r in results["rows"].values():
        comp = r.get("composed")
        cells = [f"{comp['per_task'][t]['correct']}/{comp['per_task'][t]['n']} "
                 f"({comp['per_task'][t]['one_part']})" if comp else "-" for t in tasks]
        test = f"{r['test']['accuracy']:.3f}" if r.get("test") else "-"
        mean = f"{comp['accuracy']:.3f}" if comp else "-"
        part = f"{comp['one_part']:.3f}" if comp else "-"
        lines.append(f"| {r['model']} | {r['gates']} | {test} | {mean} | {part} | " + " | ".join(cells) + " |")
    lines += ["", "Exact match of greedy outputs. Test records under explicit gates get their own skill's "
              "gate alone; composed records get both component skills' gates at the value shown. "
              "\"one part only\": composed outputs that are not right but equal one component skill's "
              "own answer (in brackets per task)."]
    for name, choice in results.get("gate_choice", {}).items():
        pairs = "; ".join(f"{t} {a:g}/{b:g}" for t, (a, b) in choice["chosen"].items())
        lines.append(f"Gates chosen for {name} on the validation composed records ({len(choice['validation'])} "
                     f"pairs tried; first skill/second skill): {pairs}")
    lines += ["", "Removal (supervised CS-ReFT; router gates with one skill's gate replaced in every row):", "",
              "| skill | own: router | own: gate 0 | own: gate -1 | others: router | others: gate 0 | others: gate -1 |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s, row in results["removal"].items():
        cells = [row[k][who] for who in ("own", "others") for k in ("router", "gate 0", "gate -1")]
        lines.append(f"| {s} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def union_gates(model, records, value) -> torch.Tensor:
    """(N, k) gates: each composed record's component skills at `value` (one number, or per task a
    pair in the order of record["skills"]), the rest 0."""
    gates = torch.zeros(len(records), model.csreft_config.num_subspaces)
    for i, r in enumerate(records):
        pair = value[r["skill"]] if isinstance(value, dict) else (value, value)
        for s, v in zip(r["skills"], pair):
            gates[i, model.skill_names.index(s)] = v
    return gates


def choose_gates(suite, model, tokenizer, val, grid, max_new_tokens) -> dict:
    """Per composed task, the pair of component gates from grid x grid with the most exact matches
    on the validation composed records (ties: more "one part", then the pair nearest (1, 1))."""
    tried = {}
    for pair in itertools.product(grid, grid):
        res = score(suite, model, tokenizer, val, max_new_tokens, gates=union_gates(model, val, {
            r["skill"]: pair for r in val}))
        tried[f"{pair[0]:g},{pair[1]:g}"] = {t: [v["correct"], v["one_part"]] for t, v in res["per_task"].items()}
    chosen = {}
    for task in dict.fromkeys(r["skill"] for r in val):
        best = max(tried, key=lambda k: (*tried[k][task], -sum(abs(float(g) - 1) for g in k.split(","))))
        chosen[task] = [float(g) for g in best.split(",")]
    return {"chosen": chosen, "validation": tried}


def unions(evaluate, name, label, model, test, composed, values, chosen=None):
    """Explicit unions at each gate value (test records, own skill's gate alone, scored once, at 1)
    and at the per-task gates chosen on validation."""
    for v in values:
        evaluate(f"{name}-union" + ("" if v == 1 else f"-{v:g}"), label, f"explicit union, gates {v:g} each", model,
                 {"skills": [[r["skill"]] for r in test]} if v == 1 else None,
                 {"gates": union_gates(model, composed, v)})
    if chosen is not None:
        evaluate(f"{name}-union-chosen", label, "explicit union, gates chosen on validation", model, None,
                 {"gates": union_gates(model, composed, chosen["chosen"])})


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    union_values = [float(v) for v in args.union_gates.split(",")]
    check_reuse(args, out)
    timer = Timer()
    if args.reuse and (out / "composition.json").exists():  # training times of the adapters reused
        timer.seconds = {k: v for k, v in json.loads((out / "composition.json").read_text())["seconds"].items()
                         if k.startswith(("train ", "compose "))}
    suite = builtin_suite(args.seed, args.train_per_skill, args.test_per_skill, args.composed)
    skills = sorted(suite.skills)
    data = write_jsonl(out / "data" / "train.jsonl", suite.train)

    supervised = train(args, timer, "train supervised CS-ReFT", out / "supervised", data, args.steps,
                       num_subspaces=len(skills), skill_routing=True)
    specialists = []
    for s in skills:
        own = write_jsonl(out / "data" / f"train-{s}.jsonl", [r for r in suite.train if r["skill"] == s])
        specialists.append(train(args, timer, f"train specialist {s}", out / "specialists" / s, own,
                                 args.specialist_steps, num_subspaces=1, use_router=False))
    base, tokenizer = load_base(args.model) if args.model else load_base()
    if not reusable(args, out / "library"):
        library = timer("compose library", CSReftModel.from_adapters, base, specialists, seed=args.seed)
        library.save_pretrained(out / "library", metadata=library.composition)
        library.remove_hooks()
    routed_library = train(args, timer, "train library router", out / "library-router", data, args.router_steps,
                           init_adapter=str(out / "library"), train="router", skill_routing=True,
                           layers=None, rank=None, positions=None)

    test, composed = suite.test, suite.composed
    grid = [float(v) for v in args.gate_grid.split(",")] if args.gate_grid else []
    seen = {r["prompt"] for r in composed}  # validation: further composed inputs, also unseen in training
    val = [r for r in builtin_suite(args.seed, args.train_per_skill, args.test_per_skill,
                                    args.composed + args.composed_val).composed if r["prompt"] not in seen]

    def gate_choice(name, model):
        if not (grid and val):
            return None
        results["gate_choice"][name] = timer(f"choose gates {name}", choose_gates, suite, model, tokenizer, val, grid,
                                             args.max_new_tokens)
        return results["gate_choice"][name]
    results = {"args": vars(args), "skills": skills, "rows": {}, "gate_choice": {}, "seconds": timer.seconds}

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
    unions(evaluate, "supervised", "CS-ReFT, supervised routing", model, test, composed, union_values,
           gate_choice("supervised", model))
    chosen = skills if args.removal_skills == "all" else [s.strip() for s in args.removal_skills.split(",")]
    results["removal"] = timer("removal", removal, suite, model, tokenizer, test, chosen, args)
    model.remove_hooks()
    model = CSReftModel.from_pretrained(base, routed_library)
    evaluate("library-router", "library of 6 specialists", "router trained on top", model, {}, {})
    unions(evaluate, "library", "library of 6 specialists", model, test, composed, union_values,
           gate_choice("library", model))
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
