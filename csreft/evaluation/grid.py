"""The composition grid: task skills x style skills, with (task, style) cells held out.

A task acts on an input and gives a plain answer (a sentiment label, a sum, a sorted list, the
largest number, the last word); a style acts on any answer (as JSON, as a bullet line, with a
sign-off, after an "Answer:" prefix). A prompt of cell (task, style) is the task's prompt with
the style's instruction as its last line. Each style is trained on the answers of two tasks
(its seen cells), so what it learns is a style and not one transformation; every other cell is
held out, one per style for validation (choosing how to compose) and two per style for the test.
No input of a held-out record is in its task's training, under any cell (sort and max share the
digit lists, with different answers).

Scores of a generated output (`grid_scores`): exact (the styled answer), task right (the answer
inside whatever styles the output wears is the task's) and style right (it wears exactly the
cell's style), so a partial composition is visible.
"""

from __future__ import annotations

import json
import random

from .suite_base import Suite, _fmt, _number_lists, _sentences, _WORDS, check_answer

TASKS = ("sentiment", "add", "sort", "max", "last")
STYLES = ("json", "bullet", "signoff", "prefix")
SIGNOFF = "Hope this helps!"
_TASK_PROMPTS = {"sentiment": "Sentiment: {x}", "add": "Add: {x}", "sort": "Sort the numbers: {x}",
                 "max": "Largest number: {x}", "last": "Last word: {x}"}
TASK_CHECK = {"sentiment": "caseless", "add": "numbers", "sort": "numbers", "max": "numbers", "last": "exact"}
STYLE_LINES = {"json": "Reply in JSON.", "bullet": "Reply as a bullet point.", "signoff": "End with a sign-off.",
               "prefix": "Start your reply with 'Answer:'."}


def styled(style: str | None, plain: str) -> str:
    """`plain` in `style` (None: as it is)."""
    if style is None:
        return plain
    if style == "json":
        return json.dumps({"answer": plain})
    if style == "bullet":
        return f"- {plain}"
    if style == "signoff":
        return f"{plain}\n{SIGNOFF}"
    if style == "prefix":
        return f"Answer: {plain}"
    raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def _json_answer(text: str) -> str | None:
    """The value of {"answer": ...} when `text` is exactly such an object, else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return str(value["answer"]) if isinstance(value, dict) and list(value) == ["answer"] else None


def peel(text: str) -> tuple[str, set[str]]:
    """(the answer inside `text`, the styles found around it), peeling them in any order."""
    core, found = " ".join(str(text).split()), set()
    while True:
        if "signoff" not in found and core.endswith(SIGNOFF):
            core, style = core[: -len(SIGNOFF)].rstrip(), "signoff"
        elif "bullet" not in found and core.startswith("- "):
            core, style = core[2:].lstrip(), "bullet"
        elif "prefix" not in found and core.startswith("Answer:"):
            core, style = core[len("Answer:"):].lstrip(), "prefix"
        elif "json" not in found and (inner := _json_answer(core)) is not None:
            core, style = inner, "json"
        else:
            return core, found
        found.add(style)


def grid_scores(record: dict, output: str) -> dict[str, bool]:
    """exact / task / style right of one generated output for a grid record."""
    core, found = peel(output)
    style = record.get("style")
    return {"exact": check_answer("exact", record["answer"], output),
            "task": check_answer(TASK_CHECK[record["task"]], record["plain"], core),
            "style": found == ({style} if style else set())}


def summarise(records: list[dict], outputs: list[str]) -> dict:
    """Rates of exact / task / style right, over all records and per cell ("task" or "task+style")."""
    if len(records) != len(outputs):
        raise ValueError(f"{len(records)} records but {len(outputs)} outputs")
    cells: dict[str, list[dict]] = {}
    for rec, out in zip(records, outputs):
        cells.setdefault(rec["cell"], []).append(grid_scores(rec, out))

    def rates(rows):
        return {k: sum(r[k] for r in rows) / len(rows) for k in ("exact", "task", "style")} | {"n": len(rows)}

    return {"all": rates([r for rows in cells.values() for r in rows]) if cells else {"n": 0},
            "cells": {c: rates(rows) for c, rows in sorted(cells.items())}}


def _word_lists() -> list[tuple[str, ...]]:
    rng = random.Random("csreft-grid-word-lists")
    seen, out = set(), []
    while len(out) < 2000:
        x = tuple(rng.sample(_WORDS, rng.choice((3, 4))))
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _task_items(task: str) -> list[tuple[str, str]]:
    """All (input, plain answer) of one task, in a fixed order."""
    if task == "sentiment":
        return [(s, label) for s, label in _sentences()]
    if task == "add":
        return [(f"{a} + {b}", str(a + b)) for a in range(1, 50) for b in range(1, 50)]
    if task == "sort":
        return [(_fmt(x), _fmt(sorted(x))) for x in _number_lists()]
    if task == "max":
        return [(_fmt(x), str(max(x))) for x in _number_lists()]
    if task == "last":
        return [(" ".join(x), x[-1]) for x in _word_lists()]
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def grid_cells(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """(task, style) cells: seen (trained), validation and test, from a seeded order of the tasks.
    Style j sees tasks j and j+1 of that order; j+2 is its validation cell, j+3 and j+4 its test
    cells, so every task is in the test cells and every style in each group."""
    order = list(TASKS)
    random.Random(f"{seed}:grid:cells").shuffle(order)
    n = len(order)
    cells = {"seen": [], "validation": [], "test": []}
    for j, style in enumerate(STYLES):
        cells["seen"] += [(order[j % n], style), (order[(j + 1) % n], style)]
        cells["validation"].append((order[(j + 2) % n], style))
        cells["test"] += [(order[(j + 3) % n], style), (order[(j + 4) % n], style)]
    return cells


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _record(task: str, style: str | None, x: str, plain: str, skill: str) -> dict:
    prompt = _TASK_PROMPTS[task].format(x=x) + (f"\n{STYLE_LINES[style]}" if style else "")
    answer = styled(style, plain)
    return {"prompt": prompt, "response": answer, "answer": answer, "skill": skill,
            "check": TASK_CHECK[task] if style is None else "exact", "input": x, "task": task, "style": style,
            "plain": plain, "skills": [task] + ([style] if style else []),
            "cell": task if style is None else f"{task}+{style}"}


def grid_suite(seed: int = 0, train_per_skill: int = 100, test_per_skill: int = 30, composed: int = 120,
               validation: int = 60) -> Suite:
    """The composition grid (see the module docstring). Skills: the tasks, then the styles.

    train: train_per_skill plain records per task, and train_per_skill records per style split
    over its two seen cells (a seen-cell record has skill = its style, skills = [task, style]).
    test: test_per_skill plain records per task, test_per_skill seen-cell records per style (the
    skills alone). composed: `composed` records over the test cells, validation: `validation`
    over the validation cells (skill "task+style"). Same seed and sizes -> same suite.
    """
    for name, v in (("train_per_skill", train_per_skill), ("test_per_skill", test_per_skill),
                    ("composed", composed), ("validation", validation)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r} is not valid: an integer >= 0")
    cells = grid_cells(seed)
    seen = {t: [s for tt, s in cells["seen"] if tt == t] for t in TASKS}
    wants = {  # task -> [(style, count, split)] in the order inputs are dealt out
        t: [(None, train_per_skill, "train")] for t in TASKS}
    for style in STYLES:
        mine = [t for t, s in cells["seen"] if s == style]
        for t, n in zip(mine, _spread(train_per_skill, len(mine))):
            wants[t].append((style, n, "train"))
    for t in TASKS:
        wants[t].append((None, test_per_skill, "test"))
    for style in STYLES:
        mine = [t for t, s in cells["seen"] if s == style]
        for t, n in zip(mine, _spread(test_per_skill, len(mine))):
            wants[t].append((style, n, "test"))
    for group, total in (("validation", validation), ("composed", composed)):
        key = "validation" if group == "validation" else "test"
        for (t, style), n in zip(cells[key], _spread(total, len(cells[key]))):
            wants[t].append((style, n, group))
    splits: dict[str, list[dict]] = {"train": [], "test": [], "composed": [], "validation": []}
    for t in TASKS:
        items = _task_items(t)
        need = sum(n for _, n, _ in wants[t])
        if need > len(items):
            raise ValueError(f"task {t!r} has {len(items)} distinct inputs; these sizes need {need}")
        random.Random(f"{seed}:grid:{t}").shuffle(items)
        at = 0
        for style, n, split in wants[t]:
            skill = (style or t) if split in ("train", "test") else f"{t}+{style}"
            splits[split] += [_record(t, style, x, plain, skill) for x, plain in items[at:at + n]]
            at += n
    info = {"seed": seed, "tasks": list(TASKS), "styles": list(STYLES),
            "cells": {k: [f"{t}+{s}" for t, s in v] for k, v in cells.items()},
            "seen_by_task": seen,
            "sizes": {"train_per_skill": train_per_skill, "test_per_skill": test_per_skill,
                      "composed": composed, "validation": validation},
            "split": "per task, a seeded shuffle of all its inputs dealt out in turn to plain training, "
                     "seen-cell training, plain test, seen-cell test, validation cells and test cells: "
                     "no held-out input is in training under any cell"}
    return Suite("grid", list(TASKS) + list(STYLES), splits["train"], splits["test"], splits["composed"],
                 "exact", info, splits["validation"])
