"""`csreft info`: the configuration and its trainable-parameter table, no weights loaded."""

from __future__ import annotations

import argparse

from ..base_models import DEFAULT_MODEL
from ..config import CSReftConfig
from ..training.options import CONFIG_FIELDS
from .common import add_config_file_option, options_with_file, warn
from .options import HelpFormatter, option_parser


def config_from_options(opts: dict) -> CSReftConfig:
    try:
        return CSReftConfig(**{k: v for k, v in opts.items() if k in CONFIG_FIELDS})
    except (TypeError, ValueError) as err:
        raise SystemExit(f"csreft: invalid configuration: {err}")


def base_model_config(model_name: str, base_shape: dict | None = None):
    """The base model's config; with `base_shape` (a mapping with model_type, hidden_size, ...)
    only the local cache is tried, and the shape is used when the config is not there."""
    from transformers import AutoConfig

    from ..base_models import resolve_model_path

    if not base_shape:
        return AutoConfig.from_pretrained(resolve_model_path(model_name))
    try:
        return AutoConfig.from_pretrained(resolve_model_path(model_name), local_files_only=True)
    except Exception as err:  # not cached, gated, offline, ...
        shape = dict(base_shape)
        warn(f"base model config not available locally ({type(err).__name__}); using base_shape "
             "from the configuration")
        try:
            return AutoConfig.for_model(shape.pop("model_type"), **shape)
        except (KeyError, ValueError) as bad:
            raise SystemExit(f"csreft: base_shape {base_shape}: needs model_type and the shape fields ({bad})")


def cmd_info(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ..model import get_csreft_model
    from .train import train_options

    opts = options_with_file(args, train_options())  # a file is a training recipe
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


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="configuration and trainable-parameter table (no weights loaded)",
                       parents=[option_parser(CSReftConfig)], formatter_class=HelpFormatter,
                       usage="csreft info [--model MODEL] [--config FILE] [CSReftConfig flags]")
    p.add_argument("--model", help=f"the base model whose shape is counted (default: {DEFAULT_MODEL})")
    add_config_file_option(p)
    p.set_defaults(func=cmd_info)
