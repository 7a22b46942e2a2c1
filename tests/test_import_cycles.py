"""No import cycle among lamina's modules, counting every import the source names.

The package is read with ast, not imported: a function-local import (taken
lazily for start-up time) and a `TYPE_CHECKING` import are dependencies all
the same, and a cycle hidden in a function body is still a knot to read
through. A new cycle fails here with the modules it runs through.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lamina"

# Cycles that exist and are not broken yet, each as the sorted tuple of its
# modules. Empty is the goal (and the state since issue 12): a cycle that is
# broken must leave this list.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the lamina modules it imports anywhere in its source."""
    modules = _modules(root)
    top = root.name

    def known(name: str) -> str | None:
        # `from lamina.oci import image` names the module lamina.oci.image;
        # `from lamina.oci.image import Digest` names lamina.oci.image.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(known(alias.name) for alias in node.names if alias.name.split(".")[0] == top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != top:
                    continue
                for alias in node.names:
                    deps.add(known(f"{source}.{alias.name}") or known(source))
        graph[name] = {dep for dep in deps if dep is not None and dep != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(component: tuple[str, ...], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_no_new_import_cycle() -> None:
    graph = import_graph()
    new = cycles(graph) - KNOWN_CYCLES
    assert not new, "import cycles among lamina modules:\n" + "\n".join(
        _describe(component, graph) for component in sorted(new)
    )


def test_known_cycles_still_exist() -> None:
    # A cycle that was broken leaves KNOWN_CYCLES, so it cannot come back unseen.
    gone = KNOWN_CYCLES - cycles(import_graph())
    assert not gone, f"broken cycles still listed in KNOWN_CYCLES: {sorted(gone)}"


def test_the_graph_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (root / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n"
    )
    (root / "sub" / "c.py").write_text("import pkg.a\n")
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert cycles(graph) == {("pkg.a", "pkg.sub.b", "pkg.sub.c")}
