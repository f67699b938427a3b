"""House order: the modules of app/ and training/ import each other without cycles, counting every import statement
(top-level and function-local alike: a function-local import that dodges a cycle is still a cycle).

Imports under `if TYPE_CHECKING:` never run and are left out. A package's own `__init__` is not an edge of its
submodules (Python initialises a parent package before its children), so only written imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("app", "training")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (the submodule when `from pkg import submodule`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def target(module: str) -> str | None:
        while module and module not in known:  # `import app.state.x.Y` names module app.state.x
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(t for alias in node.names if (t := target(alias.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif t := target(base):
                    found.add(t)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, set(known)) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None (depth-first search, three colours)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_local_import(tmp_path):
    graph = {"app.app": {"app.pages.train"}, "app.pages.train": {"app.state.telemetry"}, "app.state.telemetry": {"app.app"}}
    assert find_cycle(graph) == ["app.app", "app.pages.train", "app.state.telemetry", "app.app"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    local = tmp_path / "mod.py"
    local.write_text("import os\n\ndef f():\n    from app.app import app\n    from app.state import follow\n")
    assert imported("app.state.telemetry", local, {"app.app", "app.state", "app.state.follow"}) == {"app.app", "app.state.follow"}


def test_imports_under_type_checking_do_not_count(tmp_path):
    typed = tmp_path / "mod.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from training.runs import Registry\n")
    assert imported("training.jobs", typed, {"training.runs"}) == set()


def test_the_graph_covers_every_module_of_both_packages():
    graph = import_graph()
    assert {"app.app", "app.state.telemetry", "app.state.train", "training.cli", "training.trainer"} <= set(graph)
    assert "app.state.follow" in graph["app.state.train"]  # `from app.state.follow import ...` is an edge


@pytest.mark.parametrize("package", PACKAGES)
def test_there_are_no_import_cycles(package):
    graph = import_graph()
    within = {name: {t for t in targets if t.split(".")[0] == package} for name, targets in graph.items()
              if name.split(".")[0] == package}  # fmt: skip
    assert find_cycle(within) is None, "import cycle: " + " -> ".join(find_cycle(within) or [])


def test_there_are_no_import_cycles_across_the_packages():
    graph = import_graph()
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph) or [])
