"""The documentation says what the code does: the option tables equal the dataclasses' fields,
`--help` explains every option, the README stays a front page, and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from csreft import CSReftConfig
from csreft.cli import command_parser
from csreft.cli.options import options_table
from csreft.comparison.options import CompareOptions
from csreft.training.options import TrainingOptions

ROOT = Path(__file__).resolve().parents[1]


def tables(text: str) -> list[str]:
    return re.findall(r"^\| option \| default \| meaning \|\n(?:^\|.*\n?)+", text, re.M)


def test_configuration_tables_are_the_fields():
    found = [t.strip() for t in tables((ROOT / "docs" / "configuration.md").read_text())]
    expected = [options_table(kind) for kind in (CSReftConfig, TrainingOptions, CompareOptions)]
    assert found == expected, "regenerate the tables of docs/configuration.md with csreft.cli.options.options_table"


@pytest.mark.parametrize("command", ["train", "compare", "demo", "info"])
def test_help_describes_every_option_in_a_sentence(command):
    parser = command_parser(command)
    options = [a for a in parser._actions if a.option_strings and a.help != "==SUPPRESS=="]
    assert len(options) > 10
    for action in options:
        words = re.sub(r"\(default: [^)]*\)", "", action.help or "").split()
        assert len(words) >= 3, f"csreft {command} {action.option_strings[0]}: help {action.help!r}"


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 20_000
    for section in ("make demo", "make test", "## Quick start", "## Command line"):
        assert section in readme
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not link.startswith(("http://", "https://")):
                assert (page.parent / link).exists(), f"{page.relative_to(ROOT)}: broken link {link}"


def test_every_markdown_table_renders():
    """GitHub shows a table as plain text when its delimiter row has a different cell count from its header."""
    bad = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines[1:], 1):
            if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line) and lines[i - 1].count("|") != line.count("|"):
                bad.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not bad, bad
