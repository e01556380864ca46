"""`csreft compare` and `csreft demo`: base vs LoReFT vs specialists vs CS-ReFT vs LoRA on a suite."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..comparison.options import CompareOptions
from .common import add_config_file_option, options_with_file
from .options import HelpFormatter, option_parser

# lr 3e-3: what validation selection chose for both LoReFT and CS-ReFT on this suite
# (docs/results/routing-study.md); a fixed lr keeps the demo's 10 minutes for training
DEMO_DEFAULTS = dict(suite="builtin", methods="base,loreft,csreft", seeds=1, max_steps=None,
                     max_minutes=10.0, train_per_skill=60, test_per_skill=20, composed=30,
                     val_per_skill=10, lr=3e-3, output_dir="runs/demo")


def cmd_compare(args: argparse.Namespace) -> None:
    from ..comparison.report import summary_lines
    from ..comparison.runner import compare

    given = options_with_file(args, option_parser(CompareOptions))
    opts = {**(DEMO_DEFAULTS if args.command == "demo" else {}), **given}
    report = compare(CompareOptions(**opts))
    out = opts.get("output_dir") or CompareOptions.output_dir
    print("\n".join(summary_lines(report)))
    print(f"\nfull report: {Path(out) / 'report.md'} (report.json, gate heatmaps and per-run results in {out})")


def add_parsers(sub) -> None:
    for name, defaults, text in (
            ("compare", {}, "base vs LoReFT vs specialists vs CS-ReFT vs LoRA on a suite"),
            ("demo", DEMO_DEFAULTS, "the main job: a reduced comparison on the built-in suite (~10 min on 2 CPU cores)")):
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter,
                           parents=[option_parser(CompareOptions, defaults=defaults)],
                           usage=f"csreft {name} [--config FILE] [comparison flags]")
        add_config_file_option(p)
        p.set_defaults(func=cmd_compare)
