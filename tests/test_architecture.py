"""The shape of the house: imports run one way. The engine imports nothing of the service but core.spec, the API
never imports the worker, no package imports itself in a circle, and the API starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "api", "worker", "cli")


def modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name, found from this file's location."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    assert {name.split(".")[0] for name in found} == set(PACKAGES), f"packages missing under {REPO}"
    return found


def imports(path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    """The project modules `path` imports (all of them, or those run at import time: not inside functions or
    `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    nodes = _top_level(tree.body) if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def _top_level(body: list[ast.stmt]) -> Iterator[ast.AST]:
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Try | ast.If):
            yield from _top_level(node.body + getattr(node, "orelse", []))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def project_imports(path: Path, known: dict[str, Path], **kwargs: bool) -> set[str]:
    return {name for name in imports(path, **kwargs) if name in known}


def test_the_modules_are_found():
    found = modules()
    assert {"core.spec", "core.engine.trainer", "api.main", "worker.tasks", "cli.main"} <= set(found)


def test_the_engine_imports_only_the_spec_from_the_service():
    found = modules()
    engine = {name: path for name, path in found.items() if name.startswith("core.engine")}
    assert len(engine) > 5
    for name, path in engine.items():
        outside = {m for m in project_imports(path, found) if not m.startswith("core.engine") and m != "core.spec"}
        assert outside <= {"core"}, (name, outside)  # `from core import x` names the package, then the module


def test_the_api_never_imports_the_worker():
    found = modules()
    for name, path in found.items():
        if name.split(".")[0] == "api":
            assert not {m for m in imports(path) if m.split(".")[0] == "worker"}, name


def test_core_imports_neither_the_api_the_worker_nor_the_command_line():
    found = modules()
    for name, path in found.items():
        if name.split(".")[0] == "core":
            assert not {m for m in imports(path) if m.split(".")[0] in ("api", "worker", "cli")}, name


def test_no_import_cycles_at_import_time():
    found = modules()
    graph = {name: project_imports(path, found, top_level_only=True) - {name} for name, path in found.items()}
    for name in graph:  # a package's __init__ is imported with each of its modules
        parent = name.rpartition(".")[0]
        if parent in graph:
            graph[name].add(parent)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_modules_import_each_other_even_inside_functions():
    # A deferred import hides a cycle from the interpreter, not from a reader: two modules that need each other
    # are one concept split in two. Packages (their __init__) are left out: they re-export their modules.
    found = modules()
    graph = {
        name: {m for m in project_imports(path, found) if m != name and found[m].name != "__init__.py"}
        for name, path in found.items()
        if path.name != "__init__.py"
    }
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodule in __init__ is not a cycle
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_a_cycle_is_found_when_there_is_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("code", "absent"),
    [
        ("import core.engine, core.engine.trainer", ("fastapi", "sqlalchemy", "celery", "redis", "starlette")),
        ("import core.engine.events, core.models, core.jobs, api.main", ("torch", "worker", "celery")),
        # What `trickserve api` runs (it publishes through the worker's Celery app), and the worker's entry point
        # itself: a worker's main process imports torch when it starts (worker/preload.py), not on import.
        ("import cli.service, api.main, api.server, worker.celery_app, worker.main", ("torch",)),
    ],
)
def test_what_an_import_loads(code: str, absent: tuple[str, ...]):
    check = f"import sys; {code}; print([m for m in {absent!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
