"""Skill libraries that route themselves: separately trained LoReFT specialists composed into one
library, routed without any router training (signatures, data-free prototypes), against oracle
and uniform gates.

    python benchmarks/library_routing.py --suites builtin,classification,paraphrase \
        --output-dir runs/library-routing --json docs/results/data/library-routing.json

Per suite: one LoReFT (`csreft train`, k = 1, no router) per skill on that skill's training
records; the adapters saved by `csreft train` carry their signatures. The library is composed
from them (`CSReftModel.from_adapters`), and the test split is scored with its gates from:
signatures, prototypes, oracle (each record's own skill), uniform (every skill at 1/k).
Routing accuracy = share of test records whose top gate is their own skill. Finished
specialists are reused (their adapter folder), so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from csreft.evaluation.suites import get_suite

SIZES = {"builtin": dict(train_per_skill=60, test_per_skill=20),
         "classification": dict(train_per_skill=300, test_per_skill=50),
         "paraphrase": dict(train_per_skill=300, test_per_skill=50)}


def train_specialist(suite, skill: str, out: Path, args) -> Path:
    from csreft.training.recipe import run

    adapter = out / skill / "adapter"
    if (adapter / "csreft_config.json").is_file():
        return adapter
    data = out / f"{skill}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"], "skill": skill}) + "\n"
                            for r in suite.train if r["skill"] == skill))
    run({"data": str(data), "output_dir": str(out / skill), "num_subspaces": 1, "use_router": False,
         "max_steps": args.steps, "batch_size": 8, "lr": args.lr, "max_length": args.max_length, "seed": 0,
         "logging_steps": 10, "overwrite": True})
    return adapter


def routing_accuracy(gates: torch.Tensor, records, skills) -> float:
    own = torch.tensor([skills.index(r["skill"]) for r in records])
    return float((gates.argmax(1) == own).float().mean())


def study(name: str, args) -> dict:
    from csreft.base_models import load_base
    from csreft.comparison.runner import route_records
    from csreft.evaluation.scoring import evaluate_suite
    from csreft.gates import steering
    from csreft.model import CSReftModel
    from csreft.router import routing_nmi

    suite = get_suite(name, **SIZES[name])
    out = Path(args.output_dir) / name
    started = time.time()
    adapters = [train_specialist(suite, s, out, args) for s in suite.skills]
    train_s = time.time() - started
    base, tok = load_base()
    records = suite.test
    groups = sorted({r.get("group", "all") for r in records})
    result = {"suite": name, "sizes": SIZES[name], "skills": suite.skills, "steps": args.steps, "lr": args.lr,
              "train_seconds": round(train_s, 1), "n_test": len(records), "routings": {}}
    for routing in ("signatures", "prototypes"):
        model = CSReftModel.from_adapters(base, adapters, routing=routing)
        assert model.skill_names == suite.skills, model.skill_names
        t = time.time()
        gates = route_records(model, tok, records, 16)
        route_s = time.time() - t
        res = evaluate_suite(model, tok, suite, "test", records=records, batch_size=16)
        entry = {"accuracy": res["accuracy"], "per_skill": {s: v["accuracy"] for s, v in res["per_skill"].items()},
                 "routing_seconds": round(route_s, 2), "correct": res["correct"]}
        for g in groups:
            idx = [i for i, r in enumerate(records) if r.get("group", "all") == g]
            sub = [records[i] for i in idx]
            entry[f"routing_accuracy[{g}]"] = routing_accuracy(gates[idx], sub, suite.skills)
            entry[f"nmi[{g}]"] = routing_nmi(gates[idx], [r["skill"] for r in sub])["nmi"]
            entry[f"task_accuracy[{g}]"] = sum(res["correct"][i] for i in idx) / len(idx)
        result["routings"][routing] = entry
        if routing == "signatures":  # the references need no router: explicit gates
            for ref in ("oracle", "uniform"):
                correct = [None] * len(records)
                for skill in suite.skills:
                    idx = [i for i, r in enumerate(records) if r["skill"] == skill]
                    gate = {"skills": skill} if ref == "oracle" else {"gates": [1.0 / len(suite.skills)] * len(suite.skills)}
                    with steering(model, **gate):
                        r = evaluate_suite(model, tok, suite, "test", records=[records[i] for i in idx], batch_size=16)
                    for i, c in zip(idx, r["correct"]):
                        correct[i] = c
                per = {s: sum(correct[i] for i, r in enumerate(records) if r["skill"] == s) /
                       sum(r["skill"] == s for r in records) for s in suite.skills}
                entry = {"accuracy": sum(per.values()) / len(per), "per_skill": per, "correct": correct}
                for g in groups:
                    idx = [i for i, r in enumerate(records) if r.get("group", "all") == g]
                    entry[f"task_accuracy[{g}]"] = sum(correct[i] for i in idx) / len(idx)
                result["routings"][ref] = entry
        model.remove_hooks()
        print(json.dumps({k: v for k, v in result["routings"][routing].items() if k != "correct"}), flush=True)
    result["seconds"] = round(time.time() - started, 1)
    return result


def prefill_cost(name: str, args, repeats: int = 8) -> dict:
    """Prefill time of the library with signature routing over the same library with explicit
    gates (no routing at all), batch 16 of the suite's test prompts, one thread: best of
    `repeats`, the order alternated (the second of two calls is often faster); and the library
    router's own time on that batch's hidden states (what routing adds, without the noise of
    two full passes)."""
    from csreft.base_models import load_base
    from csreft.data import encode_example, pad_batch, template_parts
    from csreft.model import CSReftModel

    suite = get_suite(name, **SIZES[name])
    adapters = [Path(args.output_dir) / name / s / "adapter" for s in suite.skills]
    base, tok = load_base()
    model = CSReftModel.from_adapters(base, adapters, routing="signatures")
    parts = template_parts(tok)
    b = pad_batch([encode_example(tok, r["prompt"], parts=parts) for r in suite.test[:16]], tok.pad_token_id, side="left")
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "prompt_starts")}
    gates = model.route(*inputs.values())
    times = {"signatures": [], "explicit": []}
    with torch.no_grad():
        for i in range(repeats):
            for kind in (("signatures", "explicit") if i % 2 == 0 else ("explicit", "signatures")):
                t = time.perf_counter()
                model(**inputs, **({"gates": gates} if kind == "explicit" else {}))
                times[kind].append(time.perf_counter() - t)
        hidden = torch.randn(*b["input_ids"].shape, base.config.hidden_size)
        starts, ends = torch.zeros(16, dtype=torch.long), torch.full((16,), b["input_ids"].shape[1])
        router_s = []
        for _ in range(20):
            t = time.perf_counter()
            model.router(hidden, starts, ends, model.routing_table())
            router_s.append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    return {"suite": name, "batch": list(b["input_ids"].shape), "seconds": best,
            "ratio": best["signatures"] / best["explicit"], "router_seconds": min(router_s),
            "router_share_of_prefill": min(router_s) / best["explicit"]}


def grow_check(name: str, args) -> dict:
    """Add the last skill to a library of the others (compose --library LIB --add): the old
    skills' logits under explicit gates (bit-identical?) and their routing accuracy under
    signature routing, before and after."""
    from csreft.base_models import load_base
    from csreft.comparison.runner import route_records
    from csreft.data import encode_example, pad_batch, template_parts
    from csreft.model import CSReftModel

    suite = get_suite(name, **SIZES[name])
    adapters = [Path(args.output_dir) / name / s / "adapter" for s in suite.skills]
    base, tok = load_base()
    lib_dir = Path(args.output_dir) / name / "library-without-last"
    small = CSReftModel.from_adapters(base, adapters[:-1], routing="signatures")
    small.save_pretrained(lib_dir, metadata=small.composition, overwrite=True)
    small.remove_hooks()
    small = CSReftModel.from_pretrained(base, lib_dir)
    old = [r for r in suite.test if r["skill"] in suite.skills[:-1]]
    before = route_records(small, tok, old, 16)
    parts = template_parts(tok)
    b = pad_batch([encode_example(tok, r["prompt"], parts=parts) for r in old[::max(1, len(old) // 16)][:16]],
                  tok.pad_token_id, side="left")
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "prompt_starts")}
    with torch.no_grad():
        logits_before = {s: small(**inputs, skills=s).logits for s in suite.skills[:-1]}
    small.remove_hooks()
    grown = CSReftModel.from_adapters(base, [lib_dir, adapters[-1]], routing="signatures")
    assert grown.skill_names == suite.skills and grown.csreft_config.routing == "signatures"
    after = route_records(grown, tok, old, 16)
    with torch.no_grad():
        identical = all(torch.equal(logits_before[s], grown(**inputs, skills=s).logits) for s in suite.skills[:-1])
    grown.remove_hooks()
    return {"suite": name, "added": suite.skills[-1], "old_skills": suite.skills[:-1], "n_old_test": len(old),
            "old_logits_bit_identical": identical,
            "old_routing_accuracy_before": routing_accuracy(before, old, suite.skills[:-1]),
            "old_routing_accuracy_after": routing_accuracy(after, old, suite.skills)}


def table(results: list[dict]) -> str:
    lines = ["| suite | test group | routing | routing accuracy | NMI | task accuracy (%) | oracle (%) | uniform (%) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for res in results:
        groups = sorted({k.split("[")[1][:-1] for k in res["routings"]["signatures"] if k.startswith("nmi[")})
        for g in groups:
            for routing in ("signatures", "prototypes"):
                e, o, u = res["routings"][routing], res["routings"]["oracle"], res["routings"]["uniform"]
                lines.append(f"| {res['suite']} | {g} | {routing} | {e[f'routing_accuracy[{g}]']:.3f} | "
                             f"{e[f'nmi[{g}]']:.2f} | {100 * e[f'task_accuracy[{g}]']:.1f} | "
                             f"{100 * o[f'task_accuracy[{g}]']:.1f} | {100 * u[f'task_accuracy[{g}]']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suites", default="builtin,classification,paraphrase")
    p.add_argument("--steps", type=int, default=60, help="training steps of each specialist (batch 8)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--output-dir", default="runs/library-routing")
    p.add_argument("--json", default=None, help="write the results (without per-record lists) here")
    p.add_argument("--report-only", action="store_true", help="print the table of --json and stop")
    p.add_argument("--cost", default=None, metavar="SUITE", help="only measure the prefill cost of signature "
                   "routing on the finished library of SUITE (added to --json)")
    p.add_argument("--grow", default=None, metavar="SUITES", help="only add each finished library's last skill "
                   "to a library of the others and check the old skills (added to --json)")
    args = p.parse_args(argv)
    if args.cost or args.grow:
        torch.set_num_threads(1)
        found = {"prefill_cost": prefill_cost(args.cost, args)} if args.cost else \
            {"grow": [grow_check(name, args) for name in args.grow.split(",")]}
        print(json.dumps(found))
        if args.json:
            record = json.loads(Path(args.json).read_text())
            record.update(found)
            Path(args.json).write_text(json.dumps(record, indent=1))
        return
    if args.report_only:
        print(table(json.loads(Path(args.json).read_text())["results"]))
        return
    torch.set_num_threads(1)
    results = []
    for name in args.suites.split(","):
        results.append(study(name, args))
        if args.json:
            slim = [{**r, "routings": {k: {kk: vv for kk, vv in v.items() if kk != "correct"}
                                       for k, v in r["routings"].items()}} for r in results]
            Path(args.json).write_text(json.dumps({"command": "python benchmarks/library_routing.py " +
                                                   " ".join(argv or __import__("sys").argv[1:]),
                                                   "results": slim}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
