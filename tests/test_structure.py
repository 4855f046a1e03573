"""The package's shape (issue 33): no circle in its import graph, deferred imports inside functions
included (an import inside a function is still an arrow). Read from the source with ast."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "safedeploy"


def module_name(path: Path) -> str:
    """safedeploy/runbook/deploy.py -> "runbook.deploy"; a package's __init__.py is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(parts: list[str], modules: set[str]) -> str | None:
    """The module parts names: the longest prefix of it that is a module (a name imported from a module)."""
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(path: Path, modules: set[str]) -> set[str]:
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "safedeploy":
                base = []
            else:
                continue
            where = base + (node.module.split(".")[1:] if not node.level and node.module else
                            node.module.split(".") if node.module else [])
            found.update(resolve(where + [a.name], modules) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(resolve(a.name.split(".")[1:], modules) for a in node.names if a.name.startswith("safedeploy."))
    return {m for m in found if m is not None} - {name}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files} - {""}
    return {module_name(p): imports_of(p, modules) for p in files if module_name(p)}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_circle_in_the_package_imports():
    assert cycles(graph()) == []


def test_the_graph_reads_subpackages_and_relative_imports():
    edges = graph()
    assert {"errors", "units", "runbook"} <= edges["recovery"]
    assert {"runbook.bringup", "runbook.rollback", "planning", "units"} <= edges["runbook.deployment"]
    for name, imported in edges.items():
        assert all(m in edges for m in imported), (name, imported)


def test_only_cli_imports_cli():
    """The package's lines go through the Output a run carries (safedeploy.output), made by the scripts:
    no module but cli itself imports cli."""
    edges = graph()
    assert sorted(name for name, imported in edges.items() if "cli" in imported) == []

