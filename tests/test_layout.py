"""The package's architecture holds (SPEC 17): no import cycle, a runtime that loads no web stack, one version."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import promptise_asgi

PACKAGE = Path(promptise_asgi.__file__).parent
WEB_STACK = ("starlette", "uvicorn", "hypercorn", "httpx", "orjson", "prometheus_client", "h11", "httptools")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every module of the package that `path` imports, at run time or for type checking alike."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from . import x` names a submodule when there is one, else an attribute of the module `base`.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imported_modules(path, known) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_walker_sees_imports_and_finds_a_cycle() -> None:
    graph = import_graph()
    assert "promptise_asgi.runtime._process" in graph["promptise_asgi.runtime"]
    assert "promptise_asgi._errors" in graph["promptise_asgi.runtime._process"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_each_subsystem_is_a_subpackage_with_its_public_module() -> None:
    for subsystem in ("runtime", "transport", "discovery", "coordinator"):
        assert (PACKAGE / subsystem / "__init__.py").is_file(), subsystem
    private = [p.name for p in PACKAGE.glob("*.py") if p.name.startswith("_") and not p.name.startswith("__")]
    # Prefixes that were subpackages in disguise are gone.
    assert not [name for name in private if name.startswith(("_runtime_", "_coordinator_", "_etcd_", "_node_"))]


def test_the_runtime_imports_nothing_of_http() -> None:
    graph = import_graph()
    runtime = {name for name in graph if name.startswith("promptise_asgi.runtime")}
    reached = set(runtime)
    todo = list(runtime)
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert not {m for m in reached if m.startswith(("promptise_asgi.transport", "promptise_asgi._http"))}


@pytest.mark.parametrize("module", ["promptise_asgi.runtime", "promptise_asgi"])
def test_importing_it_in_a_fresh_interpreter_loads_no_web_stack(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in {WEB_STACK!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_version_lives_in_one_module() -> None:
    from promptise_asgi._version import __version__

    assert promptise_asgi.__version__ == __version__ == importlib.metadata.version("promptise-asgi")
    hits = [p for p in PACKAGE.rglob("*.py") if "__version__ =" in p.read_text()]
    assert hits == [PACKAGE / "_version.py"]
