"""The module import graph of ``fedjax_bn/`` has no cycle, imports inside functions included
(a cycle hidden by a function-level import is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedjax_bn"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(path: Path, modules: set[str]) -> set[str]:
    """The fedjax_bn modules ``path`` imports at run time, inside functions too (``from pkg
    import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= (subs & modules) or {node.module}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports(p, set(files)) - {m} for m, p in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_fedjax_bn_has_no_import_cycle() -> None:
    edges = graph()
    assert "fedjax_bn.task" in edges and edges["fedjax_bn.evaluate"]  # the walk found modules
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_rounds_and_executors_import_nothing_of_each_other() -> None:
    """A plain round and a cohort round share executors through ``stages.py``, never through
    each other; executors know nothing of rounds, options or the registry at run time."""
    edges = graph()
    ex = "fedjax_bn.execution."
    assert ex + "cohort" not in edges[ex + "round"]
    assert ex + "round" not in edges[ex + "cohort"]
    above = {ex + m for m in ("round", "cohort", "stages", "options", "registry", "build")}
    for executor in ("sequential", "lockstep", "sharded"):
        assert not edges[ex + executor] & above, (executor, edges[ex + executor] & above)
