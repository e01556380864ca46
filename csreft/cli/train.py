"""`csreft train`: train edits and router on a data file (TrainingOptions + CSReftConfig flags)."""

from __future__ import annotations

import argparse

from ..config import CSReftConfig
from ..training.options import TrainingOptions
from .common import add_config_file_option, options_with_file
from .options import HelpFormatter, option_parser


def train_options() -> argparse.ArgumentParser:
    """The flags of `csreft train` (a --config file's keys are checked by them, for `info` too)."""
    return option_parser(TrainingOptions, CSReftConfig)


def cmd_train(args: argparse.Namespace) -> None:
    from ..training import recipe

    opts = options_with_file(args, train_options())
    opts.pop("base_shape", None)  # for `csreft info` only
    recipe.run(opts)


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train edits and router on a data file",
                       parents=[train_options()], formatter_class=HelpFormatter,
                       usage="csreft train --data FILE [--config FILE] [training and CSReftConfig flags]",
                       description="Every flag below can also be a key of a --config YAML/JSON file "
                       "(e.g. configs/paper-llama2-7b.yaml); flags given override the file.")
    add_config_file_option(p)
    # the `deepspeed` launcher appends --local_rank=N; the rank is read from LOCAL_RANK, as torchrun sets it
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)
