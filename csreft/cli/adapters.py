"""Adapter files: `csreft compose` (a skill library), `csreft convert-pyreft`, `csreft push`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..base_models import DEFAULT_MODEL
from ..config import CSReftConfig
from .common import adapter_base


def _help(name: str) -> str:
    """A CSReftConfig field's help text."""
    return CSReftConfig.__dataclass_fields__[name].metadata["help"]


def _calibration(path: str, tokenizer) -> list[dict]:
    """A calibration file's prompts, encoded as training encodes them, with their skills."""
    from ..data import encode_example, load_prompts

    return [{**encode_example(tokenizer, r["prompt"], system=r["system"]), "skill": r["skill"]}
            for r in load_prompts(path)]


def cmd_compose(args: argparse.Namespace) -> None:
    from ..base_models import load_base
    from ..compose import overlap_lines
    from ..integrity import ADAPTER_CONFIG, adapter_files, check_replaceable, read_adapter_config
    from ..model import CSReftModel

    dirs = [d.strip() for d in (args.adapters or "").split(",") if d.strip()]
    added = [d.strip() for d in (args.add or "").split(",") if d.strip()]
    if args.library:
        dirs = [args.library, *dirs, *added]
    elif added:
        raise SystemExit("csreft compose: --add needs --library LIB, the composed library to add the skills to")
    if not dirs:
        raise SystemExit("csreft compose: give at least one adapter: --adapters DIR,DIR, or --library LIB --add DIR")
    out = Path(os.path.realpath(args.output_dir))
    for d in dirs:
        if not adapter_files(d)[0].is_file():
            raise SystemExit(f"csreft compose: {d}: not a csreft adapter directory (no {ADAPTER_CONFIG})")
        if d == args.library and out == Path(os.path.realpath(d)):
            continue  # grown in place: the new library replaces it atomically once it is complete
        if out == Path(os.path.realpath(d)) or out in Path(os.path.realpath(d)).parents:
            raise SystemExit(f"csreft compose: --output-dir {args.output_dir} holds the input adapter {d}: "
                             "the library would replace it; give another output directory")
    options = {k: getattr(args, k) for k in ("router_input", "gating", "routing", "routing_temperature", "top_k")
               if getattr(args, k) is not None}
    if args.library:  # the library keeps its own routing unless told otherwise
        kept = read_adapter_config(args.library)["csreft_config"]
        options = {**{k: kept[k] for k in ("routing", "routing_temperature", "top_k") if k in kept}, **options}
    if args.library and options.get("routing", "learned") == "learned" and args.router:
        print("note: a learned router cannot take new skills: the grown library gets a fresh router "
              "(train it with --train router, or compose with --routing signatures)")
    check_replaceable(args.output_dir, args.overwrite)  # a library grown in place: an adapter folder, replaceable
    base, tokenizer = load_base(args.model or adapter_base(dirs[0]), tokenizer=bool(args.calibration))
    calibration = _calibration(args.calibration, tokenizer) if args.calibration else None
    model = CSReftModel.from_adapters(base, dirs, router=args.router, seed=args.seed, calibration=calibration,
                                      **options)
    model.save_pretrained(args.output_dir, metadata=model.composition, overwrite=args.overwrite)
    c = model.csreft_config
    print(f"composed {len(dirs)} adapters into {args.output_dir}: {c.num_subspaces} subspaces "
          f"at layers {c.layers}, rank {c.rank}")
    print(f"skills: {', '.join(model.skill_names)}")
    if not args.router:
        print("router: none")
    elif c.routing != "learned":
        print(f"routing: {c.routing} (no training), top {c.top_k}, temperature {c.routing_temperature:g}")
    else:
        print("router: fresh (untrained): use --skills/--gates, train it with csreft train --init-adapter "
              f"{args.output_dir} --train router, or compose with --routing signatures")
    if model.signature_table is None:
        print("signatures: none (not every adapter has them; --calibration FILE supplies them)")
    print("overlap between imported subspaces (principal angles; 90 deg = orthogonal):")
    print("\n".join(overlap_lines(model.composition)) or "  (no layer edited by two adapters)")


def cmd_convert_pyreft(args: argparse.Namespace) -> None:
    from ..base_models import load_base
    from ..integrations.pyreft import convert_pyreft, read_pyreft
    from ..integrity import check_replaceable

    read_pyreft(args.src)  # a clear error before the base model loads
    check_replaceable(args.output_dir, args.overwrite)
    base, _ = load_base(args.model or DEFAULT_MODEL, tokenizer=False)  # the weights are all it needs
    model = convert_pyreft(args.src, base, positions=args.positions, skill=args.skill)
    model.save_pretrained(args.output_dir, metadata=model.conversion, overwrite=args.overwrite)
    c = model.csreft_config
    print(f"converted {args.src} into {args.output_dir}: {c.intervention} at layers {c.layers}, rank {c.rank}, "
          f"positions {c.positions} ({'shared' if c.share_positions else 'separate'} first/last weights), "
          f"skill {model.skill_names[0]!r}")


def cmd_push(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ..hub import push_adapter
    from ..integrity import read_adapter_config, read_weights
    from ..model import get_csreft_model
    from .info import base_model_config

    meta = read_adapter_config(args.adapter)
    read_weights(args.adapter, meta.get("weights_sha256"))  # verified before anything is sent
    config = CSReftConfig.from_dict(meta["csreft_config"])
    base_config = base_model_config(args.model or adapter_base(args.adapter), meta.get("base_model"))
    with torch.device("meta"):  # parameter counts for the card: shapes only, no weights read
        counts = get_csreft_model(AutoModelForCausalLM.from_config(base_config), config).trainable_parameters()
    url = push_adapter(args.adapter, args.repo_id, counts, private=args.private, revision=args.revision)
    print(f"pushed {args.adapter} to {args.repo_id}: {url}")


def add_parsers(sub) -> None:
    comp = sub.add_parser("compose", help="one CS-ReFT adapter (a skill library) from several trained adapters")
    comp.add_argument("--adapters", default=None, help="comma-separated adapter directories (LoReFT or CS-ReFT)")
    comp.add_argument("--library", default=None, help="a composed library to grow: its skills come first, "
                      "unchanged, then those of --add (and --adapters); --output-dir may be the library itself")
    comp.add_argument("--add", default=None, help="comma-separated adapters to add to --library, no retraining")
    comp.add_argument("--routing", default=None, choices=CSReftConfig.__dataclass_fields__["routing"]
                      .metadata["choices"], help=_help("routing") + " (default: learned; with --library, its own)")
    comp.add_argument("--routing-temperature", type=float, default=None, help=_help("routing_temperature"))
    comp.add_argument("--top-k", type=int, default=None, help="skills whose edits signature / prototype routing "
                      "turns on per input (default 1: the best one, with gate 1)")
    comp.add_argument("--calibration", default=None, help="JSON / JSONL prompts, each with the 'skill' (a library "
                      "skill name) it belongs to, no responses needed: signatures for those skills, for adapters "
                      "saved without them (pyreft imports) or trained on other prompts")
    comp.add_argument("--output-dir", required=True, help="where the composed adapter goes (written atomically)")
    comp.add_argument("--model", default=None, help="base model (default: the first adapter's base)")
    comp.add_argument("--router", action=argparse.BooleanOptionalAction, default=True,
                      help="give the library a fresh router to train with --train router (default), or none")
    comp.add_argument("--router-input", default=None, choices=CSReftConfig.__dataclass_fields__["router_input"]
                      .metadata["choices"], help="the fresh router's input: " + _help("router_input"))
    comp.add_argument("--gating", default=None, choices=CSReftConfig.__dataclass_fields__["gating"].metadata["choices"],
                      help="the fresh router's gating: " + _help("gating"))
    comp.add_argument("--seed", type=int, default=0, help="seed of the fresh router")
    comp.add_argument("--overwrite", action="store_true", help="replace an output directory that holds something other than an adapter (never a training run's)")
    comp.set_defaults(func=cmd_compose)

    conv = sub.add_parser("convert-pyreft", help="a LoReFT model saved by pyreft -> a csreft adapter")
    conv.add_argument("src", help="the directory pyreft's ReftModel.save wrote (config.json, intkey_*.bin)")
    conv.add_argument("--output-dir", required=True, help="where the csreft adapter goes (written atomically)")
    conv.add_argument("--model", default=None, help=f"the base model it was trained on (default: {DEFAULT_MODEL})")
    conv.add_argument("--positions", default="f7+l7", help="the positions pyreft's training used (not saved "
                      "in its checkpoint; default f7+l7, pyreft's LoReFT recipe)")
    conv.add_argument("--skill", default=None, help="skill name of the edit (default: the directory's name)")
    conv.add_argument("--overwrite", action="store_true", help="replace an output directory that holds something other than an adapter (never a training run's)")
    conv.set_defaults(func=cmd_convert_pyreft)

    push = sub.add_parser("push", help="upload an adapter and its model card to the Hugging Face Hub")
    push.add_argument("adapter", help="adapter directory")
    push.add_argument("repo_id", help="Hub repo, e.g. your-name/my-adapter (created if needed)")
    push.add_argument("--model", default=None, help="base model (default: the adapter's base)")
    push.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                      help="create the repo private (default: the Hub's default, public)")
    push.add_argument("--revision", default=None, help="branch to push to (default: main)")
    push.set_defaults(func=cmd_push)
