"""The package layout is the architecture: imports run downward only, and never in a circle.

Every import counts, including those inside functions and under TYPE_CHECKING: a hidden
import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fhir_dm"

# Lowest first. A package imports only packages of lower layers (siblings never each other).
LAYERS: list[set[str]] = [
    {"common"},
    {"_data"},
    {"knowledge"},
    {"core"},
    {"fhir"},
    {"writeback"},
    {"cds", "events"},
    {"population"},
    {""},  # the package root, fhir_dm/__init__.py: the public API over the core
    {"web"},
    {"cli"},
    {"__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            # `from fhir_dm.x import y` may name a module y
            yield from (f"{target}.{alias.name}" for alias in node.names)


def _modules() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in _imports(path) if target in paths and target != name}
        for name, path in paths.items()
    }


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise AssertionError(f"fhir_dm.{package} has no layer in LAYERS: add it where it belongs")


def test_every_import_runs_downward() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _modules().items()
        for target in targets
        if _package(target) != _package(module)
        and _layer(_package(target)) >= _layer(_package(module))
        and _package(target) != ""  # the root re-exports the core's API; see below
    )
    assert upward == []


def test_no_module_imports_itself_through_a_circle() -> None:
    graph = _modules()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert circles == []
