"""The package's architecture, checked from the source: wings import only lower wings (or
themselves), no module imports itself back through others, and `import csreft` stays light.

    rank 0  csreft/*.py            the core: config, edits, router, model, ...
    rank 1  training, evaluation, integrations   (independent of each other)
    rank 2  comparison
    rank 3  cli (and csreft/__main__.py, `python -m csreft`)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "csreft"
RANKS = {"core": 0, "training": 1, "evaluation": 1, "integrations": 1, "comparison": 2, "cli": 3}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, at module level or inside functions alike."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from . import x` / `from .pkg import mod` name modules; other names live in `stem`
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # csreft.x.attr -> csreft.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, root, modules) for f in files}


def wing(module: str) -> str:
    if module == "csreft.__main__":  # `python -m csreft`: the command line
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else "core"


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            mine, theirs = wing(module), wing(target)
            if target == "csreft" and mine != "core":
                continue  # the package itself: its __init__ imports the core only (checked below)
            if mine != theirs and RANKS[theirs] >= RANKS[mine]:
                problems.append(f"{module} ({mine}) imports {target} ({theirs})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_upward_import_and_no_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20 and any(graph.values())  # the walker found the package and its imports
    assert layering_problems(graph) == []
    assert cycles(graph) == []


def test_the_core_is_flat_and_every_module_is_in_a_wing():
    graph = import_graph(PACKAGE)
    assert {wing(m) for m in graph} == set(RANKS)
    assert all(wing(m) == "core" for m in graph["csreft"])  # __init__ exports the core only


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    root = tmp_path / "csreft"
    for rel, text in {"__init__.py": "", "model.py": "from .compose import x\n",
                      "compose.py": "def f():\n    from .model import y\n",
                      "training/__init__.py": "", "training/recipe.py": "from ..cli import main\n",
                      "cli/__init__.py": "from . import commands\n", "cli/commands.py": "import csreft.model\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = import_graph(root)
    assert graph["csreft.cli"] == {"csreft.cli.commands"} and graph["csreft.cli.commands"] == {"csreft.model"}
    assert layering_problems(graph) == ["csreft.training.recipe (training) imports csreft.cli (cli)"]
    assert cycles(graph) == [["csreft.compose", "csreft.model"]]


def heavy_modules_after(statement: str, heavy: tuple) -> list[str]:
    code = f"import sys; {statement}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_import_csreft_is_light():
    heavy = ("transformers.trainer", "lm_eval", "deepspeed", "peft", "matplotlib", "csreft.training",
             "csreft.cli", "csreft.comparison")
    assert heavy_modules_after("import csreft", heavy) == []


def test_the_command_line_imports_the_trainer_only_for_a_command_that_trains():
    heavy = ("transformers.trainer", "lm_eval", "deepspeed", "peft", "matplotlib", "csreft.training.recipe")
    assert heavy_modules_after("import csreft.cli; csreft.cli.build_parser()", heavy) == []
    assert "csreft.training.recipe" in heavy_modules_after("import csreft.training; csreft.training.run", heavy)
