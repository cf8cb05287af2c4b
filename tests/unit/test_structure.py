"""The package's structure, checked: no import cycles (every import counts, the lazy ones
inside functions too; only those under ``if TYPE_CHECKING:`` do not), and no function above
McCabe complexity 15 but the SPF walk, which mirrors RFC 7208 §4.6's evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

from radon.complexity import cc_visit

PACKAGE = Path(__file__).resolve().parents[2] / "policyd"
MAX_COMPLEXITY = 15
#: module → function allowed above the bound, and why.
COMPLEX_BY_DESIGN = {
    ("policyd.checks.spf_eval", "_walk"): "one branch per RFC 7208 mechanism and modifier",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for sub in ast.walk(node))
    return skipped


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports, wherever the import statement is."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _target(module, path.name == "__init__.py", node)
            for alias in node.names:  # `from . import x` may name a module
                name = f"{target}.{alias.name}"
                found.add(name if name in MODULES else target)
    return {name for name in found if name in MODULES and name != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_a_lazy_import_cycle() -> None:
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    assert "policyd.stores.sqlite" in imports_of("policyd.stores")  # open_store's lazy one


def test_no_import_cycles() -> None:
    graph = {module: imports_of(module) for module in MODULES}
    assert cycles(graph) == []


def test_no_function_above_the_complexity_bound() -> None:
    over = []
    for module, path in MODULES.items():
        for block in cc_visit(path.read_text()):
            name = block.name
            if block.complexity > MAX_COMPLEXITY and (module, name) not in COMPLEX_BY_DESIGN:
                over.append(
                    f"{module}.{getattr(block, 'classname', '') or ''}{name}: {block.complexity}"
                )
    assert over == []
