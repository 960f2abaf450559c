"""ream_hf's own imports form no loop.

The graph is read from the source (ast over ream_hf/**/*.py), not from a running import: every `import` and
`from ... import` naming a ream_hf module, relative ones resolved, becomes an edge from the importing module to the
imported one (`from .pkg import name` to the submodule `pkg.name` when there is one, else to `pkg`'s __init__).
Imports inside functions count as much as those at the top: they are deferred, not gone, and a loop that only
closes through a function-level import is still two modules that need each other (it only fails later, or under
another import order). The failure says which edges of the loop are deferred.

Parent packages are not added as edges: importing `ream_hf.io.writer` runs `ream_hf/io/__init__.py` first, but a
package's __init__ that only hands names on cannot close a loop by itself, and the edges it does have are in the
graph as its own imports.
"""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ream_hf"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """module -> {imported module: "top" or "deferred" (inside a function or class body)}, ream_hf's own only."""
    files = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    root = package.name
    graph: dict[str, dict[str, str]] = {name: {} for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        top = {id(node) for node in tree.body}
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]  # the module's package
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*here[: len(here) - node.level + 1], *([node.module] if node.module else [])]) \
                    if node.level else node.module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != root:
                    continue
                while target not in files:  # `import ream_hf.io.writer.x`-style names: the module that holds it
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    kind = "top" if id(node) in top else "deferred"
                    graph[name][target] = "top" if graph[name].get(target) == "top" else kind
    return graph


def find_loops(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One loop (its modules in order, the first repeated at the end) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for module in graph:
        if module not in index:
            visit(module)
    loops = []
    for group in groups:  # a shortest way back to the start, inside the group (breadth first)
        start = min(group)
        paths = {start: [start]}
        queue = collections.deque([start])
        while queue:
            module = queue.popleft()
            if start in graph[module]:
                loops.append(paths[module] + [start])
                break
            for target in sorted(graph[module]):
                if target in group and target not in paths:
                    paths[target] = paths[module] + [target]
                    queue.append(target)
    return loops


def describe(loop: list[str], graph: dict[str, dict[str, str]]) -> str:
    return " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(loop, loop[1:])) + f" -> {loop[-1]}"


def test_ream_hf_imports_form_no_loop():
    graph = import_graph()
    assert len(graph) > 40 and graph["ream_hf.compressor"], "the graph was read"
    loops = find_loops(graph)
    assert not loops, "import loops (each edge: where it is imported):\n" + "\n".join(describe(l, graph) for l in loops)


def test_the_loop_finder_finds_a_loop_through_a_deferred_import(tmp_path):
    package = tmp_path / "ream_hf"
    (package / "io").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "io" / "__init__.py").write_text("")
    (package / "io" / "a.py").write_text("from . import b\n")
    (package / "io" / "b.py").write_text("def f():\n    from .c import x\n")
    (package / "io" / "c.py").write_text("from ..io.a import y\nimport os\n")
    graph = import_graph(package)
    assert graph["ream_hf.io.b"] == {"ream_hf.io.c": "deferred"} and graph["ream_hf.io.c"] == {"ream_hf.io.a": "top"}
    assert find_loops(graph) == [["ream_hf.io.a", "ream_hf.io.b", "ream_hf.io.c", "ream_hf.io.a"]]


def test_import_ream_hf_runs_in_a_fresh_interpreter():
    run = subprocess.run([sys.executable, "-c", "import ream_hf, ream_hf.compressor, ream_hf.cli"],
                         capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-3000:]
