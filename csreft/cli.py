"""The `csreft` command line: info, generate, train, eval, compare, demo, data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from .base_models import DEFAULT_MODEL
from .config import CSReftConfig

_BOOL_FIELDS = {f.name for f in dataclasses.fields(CSReftConfig) if f.type in ("bool", bool)}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per CSReftConfig field (--num-subspaces, --layers 3,9,18,24, ...)."""
    group = parser.add_argument_group("CS-ReFT configuration (defaults: CSReftConfig)")
    group.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; flags override it")
    for f in dataclasses.fields(CSReftConfig):
        if f.name == "format_version":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in _BOOL_FIELDS:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "layers":
            group.add_argument(flag, help="decoder-layer indices, e.g. 3,9,18,24")
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            group.add_argument(flag, type=kind, default=None)


def read_options_file(path: str | None, command: str = "train") -> dict:
    """Options from a YAML/JSON file, each checked by `csreft COMMAND`'s own flag."""
    from . import config_file

    return config_file.read_options_file(path, command_parser(command))


def merged_options(args: argparse.Namespace) -> dict:
    """File options, overridden by every flag given on the command line. A file is a training
    recipe (checked by `csreft train`'s flags) for `info` too."""
    opts = read_options_file(getattr(args, "config", None))
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "debug")})
    return opts


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (`train`, `info`, ...)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not valid: an integer >= 1")
    return value


def adapter_base(adapter: str | None) -> str:
    """The base model an adapter was trained on (its csreft_config.json), else the default."""
    from .hub import resolve_adapter
    from .integrity import read_adapter_config

    meta = read_adapter_config(resolve_adapter(adapter)) if adapter else {}
    base = meta.get("base_model")
    return (base.get("name_or_path") if isinstance(base, dict) else None) or DEFAULT_MODEL


def config_from_options(opts: dict) -> CSReftConfig:
    names = {f.name for f in dataclasses.fields(CSReftConfig)}
    try:
        return CSReftConfig(**{k: v for k, v in opts.items() if k in names})
    except (TypeError, ValueError) as err:
        raise SystemExit(f"csreft: invalid configuration: {err}")


def cmd_info(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .model import get_csreft_model

    opts = merged_options(args)
    config = config_from_options(opts)
    model_name = opts.get("model") or DEFAULT_MODEL
    base_config = base_model_config(model_name, opts.get("base_shape"))
    with torch.device("meta"):  # shapes only: no weights are read or downloaded
        model = get_csreft_model(AutoModelForCausalLM.from_config(base_config), config)
    counts = model.trainable_parameters()
    print(f"base model: {model_name}")
    print(config.to_json())
    rows = [("edits", counts["edits"]), ("router", counts["router"]), ("total", counts["total"]),
            ("base model", counts["base"])]
    print(f"\n{'component':<12}{'parameters':>15}{'% of base':>12}")
    for name, n in rows:
        print(f"{name:<12}{n:>15,}{100.0 * n / counts['base']:>11.4f}%")


def base_model_config(model_name: str, base_shape: dict | None = None):
    """The base model's config; with `base_shape` (a mapping with model_type, hidden_size, ...)
    only the local cache is tried, and the shape is used when the config is not there."""
    from transformers import AutoConfig

    from .base_models import resolve_model_path

    if not base_shape:
        return AutoConfig.from_pretrained(resolve_model_path(model_name))
    try:
        return AutoConfig.from_pretrained(resolve_model_path(model_name), local_files_only=True)
    except Exception as err:  # not cached, gated, offline, ...
        shape = dict(base_shape)
        print(f"base model config not available locally ({type(err).__name__}); using base_shape "
              "from the configuration", file=sys.stderr)
        try:
            return AutoConfig.for_model(shape.pop("model_type"), **shape)
        except (KeyError, ValueError) as bad:
            raise SystemExit(f"csreft: base_shape {base_shape}: needs model_type and the shape fields ({bad})")


def add_gate_options(parser: argparse.ArgumentParser) -> None:
    """--skills / --gates: choose the adapter's subspaces instead of its router (csreft.gates)."""
    group = parser.add_argument_group("explicit gates (instead of the router)")
    group.add_argument("--skills", help="comma-separated skill names of the adapter to turn on, e.g. sort,upper")
    group.add_argument("--gates", help="one number per routed subspace, e.g. 0,1,0,0; a negative gate "
                       "removes a skill, > 1 amplifies it (write --gates=-1,0,... for a leading minus)")


def gate_choice(args: argparse.Namespace, command: str) -> dict:
    """The gates/skills keyword arguments the --skills/--gates flags ask for ({} for none)."""
    if args.skills is None and args.gates is None:
        return {}
    if args.skills is not None and args.gates is not None:
        raise SystemExit(f"csreft {command}: give --skills or --gates, not both")
    if not args.adapter:
        raise SystemExit(f"csreft {command}: --skills and --gates choose an adapter's subspaces: give --adapter")
    from .gates import parse_gate_list

    try:
        return {"skills": args.skills} if args.skills is not None else {"gates": parse_gate_list(args.gates)}
    except ValueError as err:
        raise SystemExit(f"csreft {command}: {err}")


def cmd_generate(args: argparse.Namespace) -> None:
    from .base_models import load_base
    from .generation import generate_texts

    from .data import read_text

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line for line in read_text(args.prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("csreft generate: give --prompt TEXT (repeatable) or --prompts-file FILE")
    choice = gate_choice(args, "generate")
    base, tokenizer = load_base(args.model or adapter_base(args.adapter))
    model = base
    if args.adapter:
        from .model import CSReftModel

        model = CSReftModel.from_pretrained(base, args.adapter)
    try:
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                               system=args.system, batch_size=args.batch_size, **choice)
    except ValueError as err:
        raise SystemExit(f"csreft generate: {err}")
    for prompt, text in zip(prompts, texts):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)


def cmd_train(args: argparse.Namespace) -> None:
    from .train import run

    opts = merged_options(args)
    for key in ("func", "command", "base_shape"):  # base_shape is for `csreft info` only
        opts.pop(key, None)
    run(opts)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per training option in csreft.train.DEFAULTS (--max-steps, --lr, ...)."""
    from .train import DEFAULTS

    helps = {
        "model": f"base model: Hub id, local path, or {DEFAULT_MODEL} (default)",
        "data": "training data: JSON / JSONL file (alpaca, prompt/response or chat records)",
        "eval_data": "evaluation data, same formats",
        "output_dir": "where checkpoints, logs and OUTPUT_DIR/adapter go",
        "warmup": "warmup steps, or a fraction (< 1) of all steps",
        "resume": "continue from the latest checkpoint in OUTPUT_DIR, or from DIR (it must be this run's)",
        "overwrite": "replace the checkpoints and adapter of an earlier run in OUTPUT_DIR",
        "skill_routing": "add the supervised routing loss from the records' 'skill' fields",
        "save_steps": "checkpoint every N steps (0: only the final adapter)",
        "init_adapter": "start from this adapter (e.g. a composed skill library) instead of fresh edits",
        "train": "what to train: all (edits and router) or router (edits frozen, bit-identical)",
    }
    group = parser.add_argument_group("training")
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if name == "resume":
            group.add_argument(flag, nargs="?", const="latest", default=None, metavar="latest|DIR", help=helps[name])
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helps.get(name))
        else:
            kind = type(default) if default is not None and not isinstance(default, str) else (
                int if name == "max_examples" else str)
            group.add_argument(flag, type=kind, default=None, help=helps.get(name, f"default: {default}"))


# lr 3e-3: what validation selection chose for both LoReFT and CS-ReFT on this suite
# (docs/routing-study.md); a fixed lr keeps the demo's 10 minutes for training
DEMO_DEFAULTS = dict(suite="builtin", methods=("base", "loreft", "csreft"), seeds=1, max_steps=None,
                     max_minutes=10.0, train_per_skill=60, test_per_skill=20, composed=30,
                     val_per_skill=10, lr=3e-3, output_dir="runs/demo")
_LISTS = ("methods", "layers", "lr_grid_reft", "lr_grid_lora")


def add_compare_options(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """One flag per CompareOptions field; `defaults` override the dataclass defaults."""
    from .compare import CompareOptions

    group = parser.add_argument_group("comparison")
    for f in dataclasses.fields(CompareOptions):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        flag = "--" + f.name.replace("_", "-")
        if f.name in _LISTS:
            extra = " (variants: csreft[key=value,...] with CSReftConfig fields and lr)" if f.name == "methods" else ""
            group.add_argument(flag, default=",".join(map(str, default)),
                               help=f"comma-separated (default: {','.join(map(str, default))}){extra}")
        elif f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            group.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import CompareOptions, compare, parse_methods
    from .suites import SuiteUnavailable

    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompareOptions)}
    try:
        parse_methods(opts["methods"])
        opts["layers"] = [int(x) for x in str(opts["layers"]).replace(";", ",").split(",") if x.strip()]
        for name in ("lr_grid_reft", "lr_grid_lora"):
            opts[name] = tuple(float(x) for x in str(opts[name]).split(",") if x.strip())
            if not opts[name] or min(opts[name]) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: give learning rates > 0, comma-separated")
        report = compare(CompareOptions(**opts))
    except (SuiteUnavailable, ValueError) as err:
        raise SystemExit(f"csreft: {err}")
    from .report import summary_lines

    path = Path(opts["output_dir"]) / "report.md"
    print("\n".join(summary_lines(report)))
    print(f"\nfull report: {path} (report.json, gate heatmaps and per-run results in {opts['output_dir']})")


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import load_records

    records = load_records(args.data)
    for r in records:
        r["skill"] = r.get("skill") or "all"
    choice = gate_choice(args, "eval")
    method = args.method or ("label" if all("choices" in r for r in records) else "exact")
    if method == "label" and not all("choices" in r for r in records):
        raise SystemExit(f"csreft eval: --method label needs a 'choices' list in every record of {args.data}")
    from .base_models import load_base

    model, tokenizer = load_base(args.model or adapter_base(args.adapter))
    if args.adapter:
        from .model import CSReftModel

        model = CSReftModel.from_pretrained(model, args.adapter)
    if choice:
        from .gates import resolve_gates, steering

        try:  # check the choice before any work
            resolve_gates(choice.get("gates"), choice.get("skills"), model.skill_names,
                          model.csreft_config.num_subspaces, 1)
        except ValueError as err:
            raise SystemExit(f"csreft eval: {err}")
        with steering(model, **choice):
            return _eval(args, model, tokenizer, records, method)
    _eval(args, model, tokenizer, records, method)


def _eval(args, model, tokenizer, records, method) -> None:
    from .data import skill_names
    from .evaluation import evaluate_suite
    from .suites import Suite

    suite = Suite(name=args.data, skills=skill_names(records), train=[], test=records,
                  scoring="label" if method == "label" else "exact")
    if method == "nll":  # scoring only: no generation
        from .evaluation import response_nll

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
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
        return
    result = evaluate_suite(model, tokenizer, suite, method=method, batch_size=args.batch_size)
    print(f"{'skill':<20}{'n':>6}{'accuracy':>10}")
    for skill, v in result["per_skill"].items():
        print(f"{skill:<20}{v['n']:>6}{v['accuracy']:>10.3f}")
    print(f"{'mean over skills':<20}{result['n']:>6}{result['accuracy']:>10.3f}  ({method}, {result['seconds']:.1f} s)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


def cmd_compose(args: argparse.Namespace) -> None:
    from .base_models import load_base
    from .compose import compose_to_directory, overlap_lines
    from .integrity import ADAPTER_CONFIG, adapter_files

    dirs = [d.strip() for d in args.adapters.split(",") if d.strip()]
    for d in dirs:
        if not adapter_files(d)[0].is_file():
            raise SystemExit(f"csreft compose: {d}: not a csreft adapter directory (no {ADAPTER_CONFIG})")
    base, _ = load_base(args.model or adapter_base(dirs[0] if dirs else None))
    options = {k: getattr(args, k) for k in ("router_input", "gating") if getattr(args, k) is not None}
    try:
        model = compose_to_directory(base, dirs, args.output_dir, router=args.router, seed=args.seed, **options)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"csreft compose: {err}")
    print(f"composed {len(dirs)} adapters into {args.output_dir}: {model.csreft_config.num_subspaces} subspaces "
          f"at layers {model.csreft_config.layers}, rank {model.csreft_config.rank}")
    print(f"skills: {', '.join(model.skill_names)}")
    print("router: " + ("fresh (untrained): use --skills/--gates, or train it with "
                        f"csreft train --init-adapter {args.output_dir} --train router" if args.router else "none"))
    print("overlap between imported subspaces (principal angles; 90 deg = orthogonal):")
    print("\n".join(overlap_lines(model.composition)) or "  (no layer edited by two adapters)")


def cmd_push(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .hub import push_adapter
    from .integrity import read_adapter_config, read_weights
    from .model import get_csreft_model

    meta = read_adapter_config(args.adapter)
    read_weights(args.adapter, meta.get("weights_sha256"))  # verified before anything is sent
    config = CSReftConfig.from_dict(meta["csreft_config"])
    base_config = base_model_config(args.model or adapter_base(args.adapter), meta.get("base_model"))
    with torch.device("meta"):  # parameter counts for the card: shapes only, no weights read
        counts = get_csreft_model(AutoModelForCausalLM.from_config(base_config), config).trainable_parameters()
    url = push_adapter(args.adapter, args.repo_id, counts, private=args.private, revision=args.revision)
    print(f"pushed {args.adapter} to {args.repo_id}: {url}")


def cmd_convert_pyreft(args: argparse.Namespace) -> None:
    from .base_models import load_base
    from .pyreft import convert_to_directory, read_pyreft

    try:
        read_pyreft(args.src)  # a clear error before the base model loads
        base, _ = load_base(args.model or DEFAULT_MODEL)
        model = convert_to_directory(args.src, base, args.output_dir, positions=args.positions, skill=args.skill)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"csreft convert-pyreft: {err}")
    c = model.csreft_config
    print(f"converted {args.src} into {args.output_dir}: {c.intervention} at layers {c.layers}, rank {c.rank}, "
          f"positions {c.positions} ({'shared' if c.share_positions else 'separate'} first/last weights), "
          f"skill {model.skill_names[0]!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csreft", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="configuration and trainable-parameter table (no weights loaded)")
    info.add_argument("--model", default=None, help=f"base model (default: {DEFAULT_MODEL})")
    add_config_options(info)
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate text with the base model or an adapter")
    gen.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--adapter", help="adapter directory (from save_pretrained / csreft train)")
    gen.add_argument("--model", default=None, help="base model (default: the adapter's base, "
                     f"else {DEFAULT_MODEL})")
    gen.add_argument("--system", help="system message (default: the chat template's own)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--batch-size", type=positive_int, default=8)
    add_gate_options(gen)
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="train edits and router on a data file")
    add_train_options(train)
    add_config_options(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="score a base model or adapter on a data file, per skill")
    ev.add_argument("--data", required=True, help="JSON / JSONL records (optional: skill, answer, choices)")
    ev.add_argument("--adapter", help="adapter directory (default: the base model alone)")
    ev.add_argument("--model", default=None, help="base model (default: the adapter's base)")
    ev.add_argument("--method", choices=("exact", "label", "nll"), default=None,
                    help="exact match of greedy output, label log-likelihood over 'choices', or "
                    "response NLL (default: label when every record has choices, else exact)")
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--output", help="write the full result (per-example correctness) as JSON")
    add_gate_options(ev)
    ev.set_defaults(func=cmd_eval)

    comp = sub.add_parser("compose", help="one CS-ReFT adapter (a skill library) from several trained adapters")
    comp.add_argument("--adapters", required=True, help="comma-separated adapter directories (LoReFT or CS-ReFT)")
    comp.add_argument("--output-dir", required=True, help="where the composed adapter goes (written atomically)")
    comp.add_argument("--model", default=None, help="base model (default: the first adapter's base)")
    comp.add_argument("--router", action=argparse.BooleanOptionalAction, default=True,
                      help="give the library a fresh router to train with --train router (default), or none")
    comp.add_argument("--router-input", default=None, help="the fresh router's input (CSReftConfig.router_input)")
    comp.add_argument("--gating", default=None, help="the fresh router's gating (CSReftConfig.gating)")
    comp.add_argument("--seed", type=int, default=0, help="seed of the fresh router")
    comp.set_defaults(func=cmd_compose)

    conv = sub.add_parser("convert-pyreft", help="a LoReFT model saved by pyreft -> a csreft adapter")
    conv.add_argument("src", help="the directory pyreft's ReftModel.save wrote (config.json, intkey_*.bin)")
    conv.add_argument("--output-dir", required=True, help="where the csreft adapter goes (written atomically)")
    conv.add_argument("--model", default=None, help=f"the base model it was trained on (default: {DEFAULT_MODEL})")
    conv.add_argument("--positions", default="f7+l7", help="the positions pyreft's training used (not saved "
                      "in its checkpoint; default f7+l7, pyreft's LoReFT recipe)")
    conv.add_argument("--skill", default=None, help="skill name of the edit (default: the directory's name)")
    conv.set_defaults(func=cmd_convert_pyreft)

    push = sub.add_parser("push", help="upload an adapter and its model card to the Hugging Face Hub")
    push.add_argument("adapter", help="adapter directory")
    push.add_argument("repo_id", help="Hub repo, e.g. your-name/my-adapter (created if needed)")
    push.add_argument("--model", default=None, help="base model (default: the adapter's base)")
    push.add_argument("--private", action=argparse.BooleanOptionalAction, default=None)
    push.add_argument("--revision", default=None, help="branch to push to (default: main)")
    push.set_defaults(func=cmd_push)

    cmp_ = sub.add_parser("compare", help="base vs LoReFT vs specialists vs CS-ReFT vs LoRA on a suite")
    add_compare_options(cmp_, {})
    cmp_.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="the main job: a reduced comparison on the built-in suite (~10 min on 2 CPU cores)")
    add_compare_options(demo, DEMO_DEFAULTS)
    demo.set_defaults(func=cmd_compare)

    from .hub_data import add_data_parser

    add_data_parser(sub)

    from .instruct_cli import add_instruct_parsers  # generate-eval, judge, response-nll, data prep

    add_instruct_parsers(sub)
    for command in sub.choices.values():  # --debug after the subcommand too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a command; an error becomes one line on stderr and exit status 1 (130 when
    interrupted), with the traceback only under --debug."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"csreft {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if args.debug:
            raise
        raise SystemExit(f"csreft {args.command}: {error_line(err)}") from None


def error_line(err: Exception) -> str:
    """One line naming the problem; errors we do not expect say so."""
    from .suites import SuiteUnavailable
    from .train import NonFiniteLossError

    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, (ValueError, OSError, NonFiniteLossError, SuiteUnavailable, ImportError)):
        text = str(err)
    else:
        text = f"unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback)"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


if __name__ == "__main__":
    main(sys.argv[1:])
