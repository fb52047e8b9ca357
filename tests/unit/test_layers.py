"""The package graph, built from the source: no cycles, and no import runs back up a layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("camoe", "consumers", "trainer")

# Package -> layer, from the ground up. An import may go to its own layer or below.
LAYERS = {
    "camoe.settings": 0,
    "camoe.features": 0,
    "camoe.clients": 1,
    "camoe.streaming": 2,
    "camoe.stack": 2,
    "trainer": 3,
    "consumers": 3,
    "camoe.apps": 4,
    "camoe.supervisor": 4,
    "camoe.sim": 5,  # the simulator and the benchmarks stand beside the product
    "camoe.bench": 5,
    "camoe.cli": 6,
}


def package(module: str) -> str:
    """The graph's node of a module: ``camoe.<part>`` inside the namespace, else its top."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "camoe" and len(parts) > 1 else parts[0]


def module_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            here = parts[:-1]  # the package a relative import starts from
            imported: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        base = ".".join([*here[: len(here) - node.level + 1], base]).strip(".")
                    # ``from camoe.stack import kafka`` imports a module, not a name.
                    imported.update(f"{base}.{alias.name}" for alias in node.names)
                    imported.add(base)
            graph[name] = {m for m in imported if m.split(".")[0] in TOP} - {name}
    modules = set(graph)
    # Resolve each import to the longest existing module it names.
    for name, targets in graph.items():
        resolved = set()
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in module_imports().items():
        edges = graph.setdefault(package(module), set())
        edges.update(package(t) for t in targets)
        edges.discard(package(module))
    return graph


def test_the_package_graph_has_no_cycle() -> None:
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_the_module_graph_has_no_cycle() -> None:
    cycle = find_cycle(module_imports())
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle or [])


def test_every_package_has_a_layer() -> None:
    assert set(package_graph()) - {"camoe"} == set(LAYERS)


def test_no_import_runs_back_up() -> None:
    upward = sorted(
        f"{source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]})"
        for source, targets in package_graph().items()
        if source in LAYERS
        for target in targets
        if target in LAYERS and LAYERS[target] > LAYERS[source]
    )
    assert not upward, "\n".join(upward)


def test_the_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
