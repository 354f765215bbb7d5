"""The package's imports form layers without cycles.

Module-level imports only (those under ``if TYPE_CHECKING:`` and inside functions are
not edges: a function may reach up a layer when it runs). The layer order is the one
``docs/architecture.md`` lists under "Layers"; a package may import its own layer and
those below it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pydotcompute"
DOC = ROOT / "docs" / "architecture.md"

KNOWN_UPWARD: set[tuple[str, str]] = set()
"""(importer, imported) package pairs allowed to point up, each with its reason.
Empty: keep it so."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    """Module → the package modules it imports at module level."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bases = [a.name for a in node.names]
                candidates = bases
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # "from pkg import mod" imports the module pkg.mod where there is one.
                candidates = [
                    f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules
                ]
                candidates = candidates or [base]
            for target in candidates:
                if target.startswith("pydotcompute") and target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layers() -> dict[str, int]:
    """Package name → layer number, from the "Layers" list of docs/architecture.md."""
    text = DOC.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"^(\d+)\. (.*)$", line.strip())
        if m:
            for name in re.findall(r"`([\w.()]+)`", m.group(2)):
                layers[name] = int(m.group(1))
    return layers


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pydotcompute"


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_package_has_a_layer() -> None:
    layers = _layers()
    packages = {_package(m) for m in _graph()}
    assert not packages - set(layers), f"packages missing from {DOC.name}'s layers"


def test_no_upward_import() -> None:
    layers = _layers()
    upward = []
    for module, targets in _graph().items():
        here = _package(module)
        for target in targets:
            there = _package(target)
            if layers[there] > layers[here] and (here, there) not in KNOWN_UPWARD:
                upward.append(
                    f"{module} (layer {layers[here]}) imports {target} (layer {layers[there]})"
                )
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_the_walker_sees_cycles_and_layers() -> None:
    """The checks above can fail: the walker finds this package's real edges."""
    graph = _graph()
    assert "pydotcompute.errors" in graph["pydotcompute.backends.base"]
    assert "pydotcompute.backends.base" in graph["pydotcompute.runtime.runtime"]
    layers = _layers()
    assert layers["errors"] < layers["backends"] < layers["runtime"]
