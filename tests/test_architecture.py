"""The package's layering, read from the source: no import cycles, and lower layers never import upper ones.

Every import counts, also those inside functions (a deferred import is still a dependency). Importing
``fxshift.a.b`` also runs ``fxshift/a/__init__.py``, so a module depends on its parent packages too
(its own packages, and the top-level ``fxshift`` package that re-exports everything, are left out).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fxshift"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    own = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}   # a module and its own packages
    parents = set()
    for target in found:
        parts = target.split(".")
        parents.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return (found | parents) - own - {"fxshift"}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert [' -> '.join(c) for c in _cycles(import_graph())] == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


FORBIDDEN = {
    # modules: the layers passes insert
    "fxshift.nn": ("fxshift.passes", "fxshift.prune", "fxshift.onnx", "fxshift.plan", "fxshift.measure"),
    # kernels
    "fxshift.ops": ("fxshift.nn", "fxshift.passes", "fxshift.onnx", "fxshift.prune", "fxshift.plan"),
    # pure tensor math
    "fxshift.decompose": ("fxshift.nn", "fxshift.passes", "fxshift.onnx", "fxshift.measure", "fxshift.plan.planner",
                          "fxshift.graph", "fxshift.trace", "fxshift.pipeline"),
    # graph logic without module swapping, and no planning
    "fxshift.prune": ("fxshift.passes", "fxshift.plan", "fxshift.onnx", "fxshift.measure"),
    # timing the round-robin helpers need nothing of fxshift
    "fxshift.measure.timing": ("fxshift",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(layer):
    graph = import_graph()
    bad = {}
    for name, deps in graph.items():
        if name == layer or name.startswith(layer + "."):
            hits = sorted(d for d in deps if any(d == f or d.startswith(f + ".") for f in FORBIDDEN[layer])
                          and not (d == layer or d.startswith(layer + ".")))
            if hits:
                bad[name] = hits
    assert bad == {}
