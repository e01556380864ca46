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


def cmd_compose(args: argparse.Namespace) -> None:
    from ..base_models import load_base
    from ..compose import overlap_lines
    from ..integrity import ADAPTER_CONFIG, adapter_files, check_replaceable
    from ..model import CSReftModel

    dirs = [d.strip() for d in args.adapters.split(",") if d.strip()]
    out = Path(os.path.realpath(args.output_dir))
    for d in dirs:
        if not adapter_files(d)[0].is_file():
            raise SystemExit(f"csreft compose: {d}: not a csreft adapter directory (no {ADAPTER_CONFIG})")
        if out == Path(os.path.realpath(d)) or out in Path(os.path.realpath(d)).parents:
            raise SystemExit(f"csreft compose: --output-dir {args.output_dir} holds the input adapter {d}: "
                             "the library would replace it; give another output directory")
    check_replaceable(args.output_dir, args.overwrite)  # before any work
    base, _ = load_base(args.model or adapter_base(dirs[0] if dirs else None), tokenizer=False)
    options = {k: getattr(args, k) for k in ("router_input", "gating") if getattr(args, k) is not None}
    model = CSReftModel.from_adapters(base, dirs, router=args.router, seed=args.seed, **options)
    model.save_pretrained(args.output_dir, metadata=model.composition, overwrite=args.overwrite)
    c = model.csreft_config
    print(f"composed {len(dirs)} adapters into {args.output_dir}: {c.num_subspaces} subspaces "
          f"at layers {c.layers}, rank {c.rank}")
    print(f"skills: {', '.join(model.skill_names)}")
    print("router: " + ("fresh (untrained): use --skills/--gates, or train it with "
                        f"csreft train --init-adapter {args.output_dir} --train router" if args.router else "none"))
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
    comp.add_argument("--adapters", required=True, help="comma-separated adapter directories (LoReFT or CS-ReFT)")
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
