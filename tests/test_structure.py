"""The package's structure: the core imports no tooling, model or pipeline module, and no module imports itself
back through others (``scripts/structure_report.py`` prints the same graph and the line counts)."""

import importlib.util
import sys

from reference import ROOT

_spec = importlib.util.spec_from_file_location("structure_report", ROOT / "scripts" / "structure_report.py")
structure = importlib.util.module_from_spec(_spec)
sys.modules["structure_report"] = structure
_spec.loader.exec_module(structure)


def _graph():
    return {m: edges for m, edges in structure.import_graph().items() if not structure.is_package_root(m)}


def test_the_package_has_no_import_cycle():
    assert structure.cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert structure.cycles(graph) == [["a", "b", "c"]]


def test_the_core_imports_no_tooling_model_or_pipeline():
    leaks = [
        f"{module} -> {target}"
        for module, edges in _graph().items()
        if structure.kind(module) == "core"
        for target in edges
        if structure.kind(target) != "core" and not structure.is_package_root(target)
    ]
    assert leaks == []


def test_the_tooling_lives_in_its_own_package():
    modules = structure.modules()
    for name in ("bench", "cli", "tiny", "reference_model", "imaging"):
        assert f"cached_diffusers.tools.{name}" in modules
        assert f"cached_diffusers.{name}" not in modules


def test_deferred_imports_count_and_type_checking_imports_do_not():
    import ast

    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import hidden\n"
        "def f():\n    import deferred\n"
    )
    names = {a.name for n in structure._runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"deferred"}
