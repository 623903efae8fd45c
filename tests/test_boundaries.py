"""Module boundaries: no import cycles among surgery.* modules, backends never import a pass
family, and `import surgery` does not load torch.

The import graph is read from the source (AST), not from a running interpreter, so an import
inside a function counts as much as one at the top: a cycle through a lazy import is still a
cycle in the design. Imports under ``if TYPE_CHECKING:`` never run and are left out.

Package ``__init__`` modules: ``from surgery.passes.lower import runtime`` is an edge to
``surgery.passes.lower.runtime``, not to ``surgery.passes.lower`` (Python runs the package's
``__init__`` first, but that is the package's own import list, which the graph holds as the
``__init__`` module's edges). An import of a package by name (``import surgery.passes``) is an
edge to its ``__init__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> package name (setup.py maps passes/ and backends/ into the surgery package).
FOLDERS = {"surgery": "surgery", "passes": "surgery.passes", "backends": "surgery.backends"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    skip.add(id(sub))
    return skip


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The surgery modules ``name`` imports (see the module docstring for packages)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_only(tree)
    package = name if _is_package(path) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {_known(a.name, modules) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else _known(base, modules))
    out.discard(None)
    out.discard(name)
    return out


def _known(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is a surgery module (None outside surgery)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components with more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_graph_sees_real_edges():
    """Guard against a graph that is empty because the parsing went wrong."""
    graph = import_graph()
    assert "surgery.skeleton" in graph["surgery.models"]
    assert "surgery.passes.lower.sites" in graph["surgery.passes.lower.triton"]
    assert "surgery.passes.attention.functional" in graph["surgery.passes.attention.intercept"]
    assert len(graph) > 100


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_surgery_modules():
    cycles = strongly_connected(import_graph())
    assert cycles == [], f"import cycles: {cycles}"


def test_no_backend_imports_a_pass_family():
    graph = import_graph()
    bad = {name: sorted(t for t in targets if t.startswith("surgery.passes"))
           for name, targets in graph.items() if name.startswith("surgery.backends")}
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.parametrize("statement", ["import surgery", "import surgery.diagnostics",
                                       "from surgery import __version__"])
def test_import_surgery_does_not_load_torch(statement):
    code = f"{statement}; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_lazy_exports_resolve_to_the_defining_modules():
    import surgery
    from surgery.api import compile as api_compile
    from surgery.diagnostics import SurgeryError

    assert surgery.SurgeryError is SurgeryError
    assert surgery.compile is api_compile
    assert set(surgery.__all__) <= set(dir(surgery))
    with pytest.raises(AttributeError, match="no_such_name"):
        surgery.no_such_name  # noqa: B018
