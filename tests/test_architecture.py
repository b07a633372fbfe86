"""The layering of docs/ARCHITECTURE.md, held by import-linter and a cycle check.

``pyproject.toml`` ``[tool.importlinter]`` declares the contracts: the layers
(common < model < scheduler < backends < engine < service | bench < cli),
backends seeing the scheduler only through ``scheduler.output``, no device
framework in the scheduler, the model description or the engine, a client
library without server code, and no cycles between sibling modules. These
tests run the linter on the tree, show that it catches a planted backward
import, and check that no two modules (files) import each other in a circle,
function-level imports included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "model", "scheduler", "backends", "engine", "service", "bench", "cli")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, planted", [
    ("scheduler/output.py", "import engine.outputs"),                 # the scheduler reaching up to the engine
    ("backends/base.py", "from scheduler.scheduler import Scheduler"),  # a backend driving the scheduler
    ("engine/outputs.py", "def _late():\n    import service.errors"),  # a function-level import counts too
])
def test_a_planted_backward_import_breaks_the_contracts(tmp_path, module, planted):
    for name in (*PACKAGES, "clients"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{planted}  # planted by the test\n")
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph(*PACKAGES)
    modules = set(graph.modules)
    # A package's __init__ that re-exports its children is not a file-to-file cycle.
    packages = {m for m in modules if graph.find_children(m)}
    cycles = _cycles(graph, modules - packages)
    assert cycles == [], "modules importing each other in a circle: " + "; ".join(" <-> ".join(c) for c in cycles)
