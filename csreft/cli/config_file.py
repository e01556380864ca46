"""--config FILE (YAML or JSON) for `csreft train`, `info`, `compare` and `demo`, checked like the flags.

Each key must be one of the command's options ('-' or '_'; an unknown key is an error with a
"did you mean"); each value goes through the flag's own argparse type, so `lr: 2e-3` (a string
to YAML) becomes 2e-3, and a boolean is true/false/yes/no/on/off/1/0 or an error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from pathlib import Path

from ..data import read_text
from .options import NULL, is_boolean

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
FILE_ONLY = {"base_shape": dict}  # options a file can give that have no flag


class ConfigFileError(ValueError):
    """A --config file that cannot be used; the message names file, line, option and value."""


def read_options_file(path: str | None, parser: argparse.ArgumentParser) -> dict:
    """Options from a YAML/JSON file, keyed by option name, each checked by `parser`'s flag."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"--config {path}: no such file")
    text = read_text(p)
    data = _parse(p, text)
    lines = _key_lines(p, text)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config", "debug")
               and not isinstance(a, argparse._StoreFalseAction)}  # not --no-NAME
    known = sorted(set(actions) | set(FILE_ONLY))
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        where = f"{path}, line {lines[str(key)]}" if str(key) in lines else str(path)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(known)}"
            raise ConfigFileError(f"{where}: unknown option {key!r}{hint}")
        action = actions.get(name)
        if value is None and getattr(getattr(action, "type", None), "accepts_none", False):
            out[name] = None  # null where None is a value other than the default
        elif value is not None:  # null: the default
            out[name] = _coerce(action, name, value, where)
    return out


def _parse(p: Path, text: str) -> dict:
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, RecursionError) as err:  # json.JSONDecodeError, with its line and column
        raise ConfigFileError(f"--config {p}: cannot parse: {err}") from err
    except Exception as err:  # yaml.YAMLError, with its line and column
        raise ConfigFileError(f"--config {p}: cannot parse: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {p}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _key_lines(p: Path, text: str) -> dict:
    """Line number (from 1) of each top-level key, for messages."""
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            node = yaml.compose(text)
        except Exception:
            return {}
        if not isinstance(node, yaml.MappingNode):
            return {}
        found = [(k.value, k.start_mark.line + 1) for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
    else:
        found = [(m.group(1), text.count("\n", 0, m.start()) + 1)
                 for m in re.finditer(r'"((?:[^"\\]|\\.)*)"\s*:', text)]
    lines = {}
    for key, line in found:  # the first occurrence (a top-level key comes before nested ones)
        lines.setdefault(key, line)
    return lines


def _coerce(action, name: str, value, where: str):
    """`value` as the flag `action` would have parsed it."""
    def bad(allowed: str):
        return ConfigFileError(f"{where}: {name}: {value!r} is not valid: {allowed}")

    if action is None:  # FILE_ONLY
        if not isinstance(value, FILE_ONLY[name]):
            raise bad(f"a {FILE_ONLY[name].__name__}")
        return value
    if is_boolean(action) or isinstance(action, argparse.BooleanOptionalAction):
        text = str(value).strip().lower() if isinstance(value, (str, bool, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad("true or false")
    if isinstance(value, list) and getattr(action.type, "__name__", "").startswith("list of"):
        return value  # the options' own checks see the entries
    if name == "resume" and isinstance(value, bool):
        return action.const if value else None
    if isinstance(value, (dict, list, bool)):
        raise bad(_describe(action))
    kind = action.type or str
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise bad("an integer")
    try:
        result = kind(int(value) if kind is int and isinstance(value, float) else value)
    except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as err:
        raise bad(_describe(action)) from err
    if result is NULL:
        return None
    if action.choices is not None and result not in action.choices:
        raise bad(f"one of {', '.join(map(str, action.choices))}")
    return result


def _describe(action) -> str:
    kind = action.type or str
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", "a value"))
