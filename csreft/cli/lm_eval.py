"""`csreft lm-eval ...`: lm-evaluation-harness's own command line with the `csreft` model
registered (csreft.integrations.lm_eval; needs pip install 'csreft[lmeval]')."""

from __future__ import annotations

import argparse


def cmd_lm_eval(args: argparse.Namespace) -> None:
    try:
        from ..integrations.lm_eval import main
    except ImportError as err:
        raise ImportError(f"{err}: pip install 'csreft[lmeval]'") from err
    main(args.arguments)


def add_parsers(sub) -> None:
    p = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the csreft model: "
                       "csreft lm-eval run --model csreft --model_args pretrained=BASE,adapter=DIR --tasks ...")
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    p.set_defaults(func=cmd_lm_eval)
