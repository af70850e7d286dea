"""The layout's import rules (docs/design.md, "Layout"), read from the source: every project import
goes in an allowed direction, no import cycle exists, and a project import inside a function says why
in a comment (an optional heavy dependency, an entry point run by path)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common.repo import REPO_ROOT
from features.submit import JOB_PACKAGES

MAY_IMPORT: dict[str, set[str]] = {
    "common": set(),
    "features": {"common"},
    "ingest": {"common", "features"},
    "trainer": {"common", "features"},
    "lifecycle": {"common", "features", "ingest", "trainer"},
    "sirenfeed": {"common", "features", "ingest", "trainer", "lifecycle"},
    "bench": {"common", "features", "ingest", "trainer", "lifecycle", "sirenfeed"},
}
"""Folder → the project folders its modules may import (its own always)."""


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the folders of :data:`MAY_IMPORT`."""
    found = {}
    for folder in MAY_IMPORT:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def project_imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of a project module."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for function in ast.walk(tree)
                   if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from package import module`` imports the module; ``from module import name`` the module.
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                       else node.module for alias in node.names]
        else:
            continue
        found += [(target, node.lineno, id(node) in in_function)
                  for target in dict.fromkeys(targets) if target.split(".")[0] in MAY_IMPORT]
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: {target for target, _, _ in project_imports(path, set(known)) if target != name}
            for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def forbidden_imports(root: Path) -> list[str]:
    """``file:line imports module`` for every import against :data:`MAY_IMPORT`."""
    known = modules(root)
    forbidden = []
    for name, path in known.items():
        folder = name.split(".")[0]
        for target, line, _ in project_imports(path, set(known)):
            if target.split(".")[0] not in MAY_IMPORT[folder] | {folder}:
                forbidden.append(f"{path.relative_to(root)}:{line} imports {target}")
    return forbidden


def test_every_project_import_goes_in_an_allowed_direction():
    forbidden = forbidden_imports(REPO_ROOT)
    assert not forbidden, "imports against docs/design.md's rules:\n" + "\n".join(forbidden)


def test_the_project_has_no_import_cycle():
    cycle = find_cycle(import_graph(REPO_ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_project_import_inside_a_function_says_why():
    known = modules(REPO_ROOT)
    silent = []
    for name, path in known.items():
        lines = path.read_text().splitlines()
        for target, line, in_function in project_imports(path, set(known)):
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if in_function and not said:
                silent.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {target}")
    assert not silent, "project imports inside functions without a comment saying why:\n" + "\n".join(silent)


def test_the_spark_submit_zip_holds_everything_the_feature_jobs_import():
    graph, reached, todo = import_graph(REPO_ROOT), set(), ["features.job", "features.resident"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert {module.split(".")[0] for module in reached} <= set(JOB_PACKAGES)


@pytest.mark.parametrize("rules_broken", ["cycle", "direction"])
def test_the_checks_catch_a_deliberate_cycle_and_a_forbidden_import(tmp_path, rules_broken):
    """The checks above on a small tree that breaks one rule (so they cannot pass vacuously)."""
    for folder in MAY_IMPORT:
        (tmp_path / folder).mkdir()
    (tmp_path / "features" / "a.py").write_text("from features.b import thing\n")
    if rules_broken == "cycle":
        (tmp_path / "features" / "b.py").write_text("from features import a\nthing = 1\n")
        assert find_cycle(import_graph(tmp_path)) == ["features.a", "features.b", "features.a"]
    else:
        (tmp_path / "features" / "b.py").write_text("from trainer.model import thing\n")
        (tmp_path / "trainer" / "model.py").write_text("thing = 1\n")
        assert find_cycle(import_graph(tmp_path)) is None
        assert forbidden_imports(tmp_path) == ["features/b.py:1 imports trainer.model"]
