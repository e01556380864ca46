"""`csreft` subcommands of the instruction-tuning experiment (see csreft.evaluation.instruct):
split-alpaca-eval, prepare-ultrafeedback, generate-eval, judge, response-nll."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..base_models import DEFAULT_MODEL
from .common import add_model_options, load_model, positive_int


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False))


def cmd_split_alpaca_eval(args: argparse.Namespace) -> None:
    from ..evaluation.instruct import split_alpaca_eval

    try:
        info = split_alpaca_eval(args.out_dir, args.source, args.train_size, args.seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"csreft split-alpaca-eval: {err}")
    print(f"{info['train']} training and {info['heldout']} held-out instructions (seed {info['seed']}) "
          f"written to {args.out_dir}: train.json, heldout.json, split.json")


def cmd_prepare_ultrafeedback(args: argparse.Namespace) -> None:
    from ..evaluation.instruct import prepare_ultrafeedback

    info = prepare_ultrafeedback(args.output, args.dataset, args.score, args.limit)
    print(f"{info['records']} prompt/response records written to {info['output']} "
          f"({info['skipped']} skipped; best completion by {info['score']})")


def cmd_generate_eval(args: argparse.Namespace) -> None:
    from ..evaluation.instruct import default_instructions, generate_outputs, load_instructions

    source = args.instructions or default_instructions()
    records = load_instructions(source, args.offset, args.limit)
    model, tokenizer, base_name = load_model(args.model, args.adapter, args.dtype, args.device)
    if args.generator:
        generator = args.generator
    elif args.adapter:  # runs/NAME/adapter -> NAME
        from ..integrity import adapter_name

        generator = adapter_name(args.adapter)
    else:
        generator = base_name
    decoding = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}
    settings = {"model": base_name, "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
                "instructions": str(Path(source).resolve()) if Path(source).is_file() else source}
    try:
        rows = generate_outputs(model, tokenizer, records, args.output, generator, args.batch_size,
                                args.max_new_tokens, args.system, settings, args.overwrite, args.seed,
                                **decoding)
    except ValueError as err:
        raise SystemExit(f"csreft generate-eval: {err}")
    print(f"{len(rows)} outputs of {generator} written to {args.output}")


def cmd_judge(args: argparse.Namespace) -> None:
    from ..evaluation.instruct import format_report, judge_pairwise, load_instructions

    outputs = json.loads(Path(args.outputs).read_text())[: args.limit]
    reference = load_instructions(args.reference)
    model, tokenizer, judge_name = load_model(args.judge_model, None, args.dtype, args.device)
    started = time.time()
    try:
        report = judge_pairwise(model, tokenizer, outputs, reference, args.margin, args.batch_size,
                                args.max_response_tokens, args.system, progress=True)
    except ValueError as err:
        raise SystemExit(f"csreft judge: {err}")
    generator = ", ".join(sorted({str(o.get("generator")) for o in outputs}))
    report = {"judge": judge_name, "generator": generator, "outputs": args.outputs, "reference": args.reference,
              "wall_seconds": round(time.time() - started, 1), **report}
    print(f"{generator} vs {args.reference} (judge {judge_name}, tie margin {args.margin})")
    print(format_report(report))
    print(f"mean preference {report['mean_preference']:.4f}; position bias (mean P(A), 0.5 = none) "
          f"{report['position_bias']:.4f}; {report['wall_seconds']} s")
    if args.report:
        _write_json(args.report, report)
        print(f"report written to {args.report}")


def cmd_response_nll(args: argparse.Namespace) -> None:
    from ..evaluation.scoring import response_nll
    from ..evaluation.instruct import load_instructions

    selected = load_instructions(args.data, args.offset, args.limit)
    records = [{"prompt": r["prompt"], "response": r["output"]} for r in selected
               if isinstance(r["output"], str) and r["output"].strip()]
    model, tokenizer, base_name = load_model(args.model, args.adapter, args.dtype, args.device)
    started = time.time()
    result = {"model": base_name, "adapter": args.adapter, "data": args.data,
              "without_reference": len(selected) - len(records),
              **response_nll(model, tokenizer, records, args.batch_size, max_length=args.max_length)}
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    if args.report:
        _write_json(args.report, result)


def add_parsers(sub) -> None:
    """Register the subcommands on the `csreft` parser's subparsers."""
    p = sub.add_parser("split-alpaca-eval", help="write the fixed train / held-out split of the AlpacaEval file")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--source", help="AlpacaEval JSON file (default: in $CSREFT_DATA, else ../shared/data)")
    p.add_argument("--train-size", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_split_alpaca_eval)

    p = sub.add_parser("prepare-ultrafeedback",
                       help="UltraFeedback -> prompt/response JSONL with the best-rated completion (needs network)")
    p.add_argument("--output", required=True)
    p.add_argument("--dataset", default="openbmb/UltraFeedback")
    p.add_argument("--score", default="fine-grained_score", choices=["fine-grained_score", "overall_score"])
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_prepare_ultrafeedback)

    p = sub.add_parser("generate-eval", help="outputs for an instruction file in AlpacaEval's format (resumable)")
    p.add_argument("--instructions", help="instruction file (default: the AlpacaEval v1 file in $CSREFT_DATA "
                   "or ../shared/data, else tatsu-lab/alpaca_eval from the Hub)")
    p.add_argument("--output", required=True, help="OUTPUT.json; progress and settings are kept next to it")
    add_model_options(p, device=True)
    p.add_argument("--generator", help="the outputs' 'generator' name (default: the run or model name)")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--system", help="system message (default: the chat template's own)")
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy decoding)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard earlier progress for OUTPUT")
    p.set_defaults(func=cmd_generate_eval)

    p = sub.add_parser("judge", help="win rate of OUTPUTS against REFERENCE with a local judge model")
    p.add_argument("--outputs", required=True, help="AlpacaEval-format outputs of the system to rate")
    p.add_argument("--reference", required=True, help="AlpacaEval-format reference outputs")
    p.add_argument("--judge-model", default=DEFAULT_MODEL, help="any local or Hub chat model")
    p.add_argument("--report", help="write the JSON report (with per-instruction preferences) here")
    p.add_argument("--margin", type=float, default=0.05, help="|p - 0.5| below this is a tie")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--max-response-tokens", type=positive_int, default=512, help="each response is cut to this")
    p.add_argument("--system", help="system message for the judge (default: the chat template's own)")
    p.add_argument("--limit", type=int, default=None, help="judge only the first N outputs")
    add_model_options(p, adapter=False, model=False, device=True)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("response-nll", help="per-token NLL of reference responses (a judge-free proxy)")
    p.add_argument("--data", required=True, help="instruction file with reference outputs (AlpacaEval or "
                   "prompt/response records; records with an empty output are skipped and counted)")
    add_model_options(p, device=True)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=512)
    p.add_argument("--report", help="write the JSON result here")
    p.set_defaults(func=cmd_response_nll)
