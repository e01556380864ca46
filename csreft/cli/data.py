"""`csreft data`: build the classification / commonsense data folders from public Hub datasets."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.suite_data import EXTRA_HINT, DataBuildError, build_data, parse_revisions


def cmd_data(args) -> None:
    """`csreft data`: build the data folders the real-data suites read."""
    try:
        build_data(args.output, args.suite, parse_revisions(args.revision), args.overwrite)
    except DataBuildError as err:
        raise SystemExit(f"csreft data: {err}")
    print(f"\ndone: use it with CSREFT_DATA={Path(args.output).resolve()} "
          "(or data_dir= in csreft.evaluation.suites)")


def add_parsers(sub) -> None:
    """The `data` subcommand."""
    p = sub.add_parser("data", help="build the classification / commonsense suite data from the Hub "
                       f"(needs {EXTRA_HINT})")
    p.add_argument("--output", required=True, metavar="DIR", help="where <suite>/<task>/{train,test}.json go; "
                   "point CSREFT_DATA at it")
    p.add_argument("--suite", choices=("classification", "commonsense", "all"), default="all")
    p.add_argument("--revision", action="append", metavar="REV|DATASET=REV",
                   help="Hub revision (branch, tag or commit) of every dataset, or DATASET=REV for one "
                   "(repeatable; default: main, the Parquet export for CogComp/trec and ybisk/piqa)")
    p.add_argument("--overwrite", action="store_true", help="replace suite folders already in DIR")
    p.set_defaults(func=cmd_data)
