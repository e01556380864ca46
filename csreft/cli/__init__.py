"""The `csreft` command line, one module per command group:

    info.py      info                                  adapters.py  compose, convert-pyreft, push
    generate.py  generate, eval                        data.py      data
    train.py     train                                 lm_eval.py   lm-eval
    compare.py   compare, demo                         instruct.py  split-alpaca-eval, prepare-ultrafeedback,
                                                                    generate-eval, judge, response-nll

An error becomes one line on stderr and exit status 1 (130 when interrupted); --debug shows
the traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import adapters, compare, data, generate, info, instruct, lm_eval, train

COMMAND_GROUPS = (info, generate, train, compare, adapters, data, instruct, lm_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csreft", description="Compositional Subspace Representation "
                                     "Fine-tuning (CS-ReFT): routed low-rank edits of a frozen causal LM.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # the `deepspeed` launcher puts --local_rank=N before the command; the rank comes from LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    for name, command in sub.choices.items():  # --debug after the subcommand too
        if name != "lm-eval":  # its arguments are lm_eval's
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (`train`, `info`, ...)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> None:
    """Run a command; an error becomes one line on stderr and exit status 1 (130 when
    interrupted), with the traceback only under --debug."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "lm-eval":  # everything after it is lm_eval's, --help too
        args.arguments = unknown + args.arguments
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
    from ..evaluation.suites import SuiteUnavailable
    from ..training.trainer import NonFiniteLossError

    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, (ValueError, OSError, NonFiniteLossError, SuiteUnavailable, ImportError)):
        text = str(err)
    else:
        text = f"unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback)"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__

