"""Flags and --config files from option dataclasses (CSReftConfig, TrainingOptions, CompareOptions).

transformers' HfArgumentParser turns each field into a flag with the field's help text
(`--max-steps` and TRL's `--max_steps` both work). Three conventions of csreft are added:
  - a flag not given is absent from the parsed namespace (not its default), so a --config file
    fills what the command line leaves out, and a run records only what the user chose;
  - list fields are comma-separated (`--layers 3,9,18,24`);
  - every boolean also has `--no-NAME` (`--bf16`, `--bf16 false` and `--no-bf16` all work);
  - an optional field with a default other than None takes `none` (`--router-hidden none`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

CONTROL = ("func", "command", "debug", "config", "local_rank")  # namespace entries that are not options


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `--max-steps` (not also `--max_steps`) and no "(default: ...)" for absent defaults."""

    def _format_action_invocation(self, action):
        strings = [s for s in action.option_strings if "_" not in s or s.replace("_", "-") not in action.option_strings]
        if not strings or action.nargs == 0:
            return ", ".join(strings or action.option_strings)
        return ", ".join(strings) + " " + self._format_args(action, self._get_default_metavar_for_optional(action))

    def _get_help_string(self, action):
        return action.help or ""


def comma_list(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in str(text).replace(";", ",").split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__} values")
    parse.__name__ = f"list of {kind.__name__}"
    return parse


NULL = object()  # an explicit "none" on the command line; given() turns it into None


def or_none(kind):
    """`kind`, or None for "none" / "null" (an Optional field whose default is not None)."""
    def parse(text: str):
        return NULL if str(text).strip().lower() in ("none", "null") else kind(text)
    parse.__name__ = getattr(kind, "__name__", "value")
    parse.accepts_none = True
    return parse


def is_boolean(action: argparse.Action) -> bool:
    return getattr(action, "type", None) is string_to_bool


def option_parser(*types, defaults: dict | None = None) -> argparse.ArgumentParser:
    """A parent parser with one flag per field of the dataclasses `types` (see the module doc);
    `defaults` replace the fields' own defaults in the help text (e.g. `csreft demo`'s)."""
    parser = HfArgumentParser([t for t in types], add_help=False)
    fields = {f.name: (t, f) for t in types for f in dataclasses.fields(t) if f.init}
    hints = {t: typing.get_type_hints(t) for t in types}
    for action in list(parser._actions):
        if action.dest not in fields:
            continue
        kind, f = fields[action.dest]
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no-NAME for a true default
            action.default, action.help = argparse.SUPPRESS, argparse.SUPPRESS
            continue
        default = shown_default((defaults or {}).get(f.name, field_default(f)))
        action.default = argparse.SUPPRESS
        if typing.get_origin(hints[kind][f.name]) in (list, tuple):
            action.nargs, action.type = None, comma_list(typing.get_args(hints[kind][f.name])[0])
        hint = hints[kind][f.name]
        if (type(None) in typing.get_args(hint) and field_default(f) is not None and callable(action.type)
                and not is_boolean(action)):
            action.type = or_none(action.type)
            action.help = f"{action.help} (none: None)"
        if is_boolean(action):
            dash = f.name.replace("_", "-")
            if f"--no-{dash}" not in parser._option_string_actions:
                parser.add_argument(f"--no-{dash}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                    help=argparse.SUPPRESS)
            action.help = f"{action.help} (--no-{dash}: off)"
        if default is not None and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help} (default: {default})"
    return parser


def field_default(f: dataclasses.Field):
    """A field's default value (made by its factory), None where it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def shown_default(value) -> str | None:
    """A default as a flag would take it: lists comma-separated; None stays None."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else None if value is None else str(value)


def given(args: argparse.Namespace) -> dict:
    """The options given on the command line (flags not given are absent, or None; an explicit
    `none` is kept as None)."""
    return {k: None if v is NULL else v for k, v in vars(args).items() if k not in CONTROL and v is not None}


def options_table(kind) -> str:
    """A Markdown table of a dataclass's options: flag, default, help (docs/configuration.md)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(kind):
        if not f.init:
            continue
        default = shown_default(field_default(f))
        shown = "" if default is None else f"`{default}`"
        rows.append(f"| `--{f.name.replace('_', '-')}` | {shown} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
