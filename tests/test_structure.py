"""The package's shape: small modules, and imports that form no cycle.

Read with ``ast`` only (nothing is imported), so these run without torch or onnx. Only
module-level imports count: an import inside a function is how a module defers an optional or
heavy dependency, and it runs after every module involved has loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "skipdeploy"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package's is its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _top_level_imports(tree: ast.Module):
    """Import statements run when the module loads: at top level, also inside top-level ``if``
    and ``try`` blocks (optional dependencies), not inside functions or classes."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            todo[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo[:0] = node.body + [n for h in node.handlers for n in h.body] + node.orelse + node.finalbody


def _imported(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports at load time, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
            sub = f"{module}.{alias.name}"
            targets.add(sub if sub in MODULES else module)
    return {t for t in targets if t in MODULES and t != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_line_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES}): split it"


def test_no_import_cycle_among_the_package_modules():
    graph = {name: _imported(name, path) for name, path in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles_and_resolves_relative_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    # A relative import names the module it reaches, and the parent package of a submodule.
    assert "skipdeploy.engines.base" in _imported("skipdeploy.engines", MODULES["skipdeploy.engines"])
    assert "skipdeploy.errors" in _imported("skipdeploy.engines.base", MODULES["skipdeploy.engines.base"])
