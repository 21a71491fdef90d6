"""Print the package's structure: lines of core versus tooling, the intra-package import graph, and its cycles.

Usage: ``python scripts/structure_report.py [--json]``. Every ``import`` / ``from ... import`` statement counts, at
module level or inside a function (a deferred import is still a dependency). ``tests/test_structure.py`` asserts on
the same graph: no cycles, and the core imports no tooling, model or pipeline module.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "cached_diffusers"
SOURCES = {PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.models": ROOT / "models", f"{PACKAGE}.pipelines": ROOT / "pipelines"}
"""Installed package name -> source directory (``models/`` and ``pipelines/`` install as subpackages)."""

TOOLING = f"{PACKAGE}.tools"
"""The benchmark, command line, tiny and reference models, imaging: they depend on the core, never the reverse."""


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package, subpackages included."""
    found = {}
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p.startswith(".") or p == "__pycache__" for p in parts):
                continue
            found[".".join((package, *parts))] = path
    return found


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for annotations only, never executed)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                pending.extend(child.orelse)
                continue
            pending.append(child)


def import_graph() -> dict[str, set[str]]:
    """``{module: {package modules it imports}}``; ``from pkg import name`` counts ``pkg.name`` when it is a module."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        edges = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, is_package)
                targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (each one an import cycle), Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_package_root(module: str) -> bool:
    """The package's and subpackages' ``__init__`` modules: lazy public namespaces that name everything."""
    return module in (PACKAGE, f"{PACKAGE}.models", f"{PACKAGE}.pipelines", TOOLING)


def kind(module: str) -> str:
    """``"tooling"``, ``"models"``, ``"pipelines"`` or ``"core"``."""
    if module == TOOLING or module.startswith(TOOLING + ".") or module == f"{PACKAGE}.__main__":
        return "tooling"  # __main__: ``python -m cached_diffusers``, the command line's entry point
    for sub in ("models", "pipelines"):
        if module.startswith(f"{PACKAGE}.{sub}"):
            return sub
    if module == f"{PACKAGE}.auto":
        return "pipelines"  # the registry front end: opens every pipeline module
    return "core"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the graph as JSON")
    args = parser.parse_args()
    graph = import_graph()
    files = modules()
    lines: dict[str, int] = {}
    for module, path in files.items():
        lines[kind(module)] = lines.get(kind(module), 0) + len(path.read_text(encoding="utf-8").splitlines())
    if args.json:
        print(json.dumps({m: sorted(e) for m, e in sorted(graph.items())}, indent=1))
        return
    print("lines:", ", ".join(f"{k} {v}" for k, v in sorted(lines.items())))
    for module in sorted(graph):
        if kind(module) == "core" and not is_package_root(module):
            print(f"  {module.removeprefix(PACKAGE + '.')} -> {', '.join(sorted(m.removeprefix(PACKAGE + '.') for m in graph[module])) or '-'}")
    found = cycles({m: {e for e in edges} for m, edges in graph.items() if not is_package_root(m)})
    print("cycles:", "; ".join(" <-> ".join(c) for c in found) if found else "none")
    leaks = sorted(
        f"{m} -> {e}" for m, edges in graph.items() if kind(m) == "core" and not is_package_root(m)
        for e in edges if kind(e) != "core" and not is_package_root(e)
    )
    print("core imports of tooling/models/pipelines:", "; ".join(leaks) if leaks else "none")


if __name__ == "__main__":
    main()
