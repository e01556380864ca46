"""`csreft generate` and `csreft eval`: a base model or an adapter on prompts or a data file."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .common import add_gate_options, add_model_options, gate_choice, load_model, positive_int


def cmd_generate(args: argparse.Namespace) -> None:
    from ..data import read_text
    from ..generation import generate_texts

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line for line in read_text(args.prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("csreft generate: give --prompt TEXT (repeatable) or --prompts-file FILE")
    choice = gate_choice(args, "generate")
    model, tokenizer, _ = load_model(args.model, args.adapter, args.dtype, args.device)
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                           system=args.system, batch_size=args.batch_size, **choice)
    for prompt, text in zip(prompts, texts):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)


def cmd_eval(args: argparse.Namespace) -> None:
    from ..data import load_records
    from ..gates import steering

    records = load_records(args.data)
    for r in records:
        r["skill"] = r.get("skill") or "all"
    choice = gate_choice(args, "eval")
    method = args.method or ("label" if all("choices" in r for r in records) else "exact")
    if method == "label" and not all("choices" in r for r in records):
        raise SystemExit(f"csreft eval: --method label needs a 'choices' list in every record of {args.data}")
    model, tokenizer, _ = load_model(args.model, args.adapter, args.dtype, args.device)
    if not choice:
        return _eval(args, model, tokenizer, records, method)
    with steering(model, **choice):  # checks the choice before any work
        _eval(args, model, tokenizer, records, method)


def _eval(args, model, tokenizer, records, method) -> None:
    from ..data import skill_names
    from ..evaluation.scoring import evaluate_suite, response_nll
    from ..evaluation.suites import Suite

    suite = Suite(name=args.data, skills=skill_names(records), train=[], test=records,
                  scoring="label" if method == "label" else "exact")
    if method == "nll":  # scoring only: no generation
        result = {"method": "nll", "per_skill": {}}
        print(f"{'skill':<20}{'n':>6}{'NLL/token':>11}")
        total = tokens = 0
        for skill in suite.skills:  # every record has a skill ("all" when it had none)
            subset = [r for r in records if r["skill"] == skill]
            scored = response_nll(model, tokenizer, subset, args.batch_size)
            result["per_skill"][skill] = {"n": len(subset), "response_nll": scored["nll"]}
            total, tokens = total + scored["nll"] * scored["tokens"], tokens + scored["tokens"]
            print(f"{skill:<20}{len(subset):>6}{scored['nll']:>11.4f}")
        result["response_nll"] = total / tokens  # token-weighted, as over all records at once
        print(f"{'all':<20}{len(records):>6}{result['response_nll']:>11.4f}  "
              f"(perplexity {math.exp(result['response_nll']):.2f})")
    else:
        result = evaluate_suite(model, tokenizer, suite, method=method, batch_size=args.batch_size)
        print(f"{'skill':<20}{'n':>6}{'accuracy':>10}")
        for skill, v in result["per_skill"].items():
            print(f"{skill:<20}{v['n']:>6}{v['accuracy']:>10.3f}")
        print(f"{'mean over skills':<20}{result['n']:>6}{result['accuracy']:>10.3f}  "
              f"({method}, {result['seconds']:.1f} s)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with the base model or an adapter")
    gen.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line")
    add_model_options(gen, device=True)
    gen.add_argument("--system", help="system message (default: the chat template's own)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per prompt")
    gen.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together")
    add_gate_options(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="score a base model or adapter on a data file, per skill")
    ev.add_argument("--data", required=True, help="JSON / JSONL records (optional: skill, answer, choices)")
    add_model_options(ev, device=True)
    ev.add_argument("--method", choices=("exact", "label", "nll"), default=None,
                    help="exact match of greedy output, label log-likelihood over 'choices', or "
                    "response NLL (default: label when every record has choices, else exact)")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="records scored together")
    ev.add_argument("--output", help="write the full result (per-example correctness) as JSON")
    add_gate_options(ev)
    ev.set_defaults(func=cmd_eval)
