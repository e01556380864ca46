"""What several commands share: argument types, loading a base with an adapter, the
--skills/--gates choice, --config files merged with the flags."""

from __future__ import annotations

import argparse
import sys

from ..base_models import DEFAULT_MODEL
from .options import given


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not valid: an integer >= 1")
    return value


def add_model_options(parser: argparse.ArgumentParser, adapter: bool = True, model: bool = True,
                      device: bool = False) -> None:
    """--adapter / --model (and --dtype / --device) as every command that loads a model takes them."""
    if adapter:
        parser.add_argument("--adapter", help="adapter directory or Hub repo id (default: the base model alone)")
    if model:
        parser.add_argument("--model", default=None, help="base model: Hub id or local path (default: the "
                            f"adapter's base, else {DEFAULT_MODEL})")
    if device:
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                            help="weights dtype (auto: float32 for the embedded model, else the checkpoint's)")
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def adapter_base(adapter: str | None) -> str:
    """The base model an adapter (a folder or a Hub repo) was trained on, else the default."""
    from ..hub import resolve_adapter
    from ..integrity import read_adapter_config

    meta = read_adapter_config(resolve_adapter(adapter)) if adapter else {}
    base = meta.get("base_model")
    return (base.get("name_or_path") if isinstance(base, dict) else None) or DEFAULT_MODEL


def load_model(model_name: str | None = None, adapter: str | None = None, dtype: str = "auto",
               device: str | None = None):
    """(model, tokenizer, base name): the base (the adapter's own by default) on `device` (cuda
    when available), with the adapter (a folder or a Hub repo id) attached when given."""
    import torch

    from ..base_models import load_base
    from ..model import CSReftModel

    model_name = model_name or adapter_base(adapter)
    base, tokenizer = load_base(model_name, dtype=None if dtype == "auto" else getattr(torch, dtype))
    base.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = CSReftModel.from_pretrained(base, adapter) if adapter else base
    return model, tokenizer, model_name


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
    from ..gates import parse_gate_list

    try:
        return {"skills": args.skills} if args.skills is not None else {"gates": parse_gate_list(args.gates)}
    except ValueError as err:
        raise SystemExit(f"csreft {command}: {err}")


def options_with_file(args: argparse.Namespace, checker: argparse.ArgumentParser) -> dict:
    """The --config file's options (each checked by `checker`'s flags), overridden by the flags given."""
    from .config_file import read_options_file

    return {**read_options_file(getattr(args, "config", None), checker), **given(args)}


def add_config_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of these options (names with - or _); "
                        "flags override it")


def warn(text: str) -> None:
    print(text, file=sys.stderr)
