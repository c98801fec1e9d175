"""The codebase's shape, checked: module and function sizes, docstrings, import direction.

These are the redesign's rules (docs/ARCHITECTURE.md): no module over 400 lines, no
function over 80, the training loop on one screen, every module saying what it is
for in its first line, no import cycle, checkpoint.py independent of the engine,
and the library never importing the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "grass_cli"
MODULES = sorted(PKG.rglob("*.py"))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


NAMES = {module_name(p): p for p in MODULES}


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size_functions_and_first_line(path: Path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400, f"{path.name}: over 400 lines"
    tree = ast.parse(text)
    doc = ast.get_docstring(tree)
    assert doc and doc.splitlines()[0].strip(), f"{path.name}: no first line saying what it is for"
    for fn in functions(tree):
        length = fn.end_lineno - fn.lineno + 1
        assert length <= 80, f"{path.name}: {fn.name} is {length} lines"


def test_the_training_loop_fits_one_screen():
    tree = ast.parse((PKG / "engine/loop.py").read_text(encoding="utf-8"))
    train = next(f for f in functions(tree) if f.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 60


def _module_level_imports(path: Path) -> set[str]:
    """grass_cli modules imported when `path` is imported, or named by its type hints
    (imports under TYPE_CHECKING count: a cycle of types is a cycle of design), not
    inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("grass_cli"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                if not base.startswith("grass_cli"):
                    continue
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in NAMES else base)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return {m for m in found if m in NAMES and m != me}


GRAPH = {name: _module_level_imports(path) for name, path in NAMES.items()}


def test_no_import_cycles():
    # explicit imports only: a package's __init__ importing its own submodules is how a
    # package re-exports, not a cycle
    graph = GRAPH
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)


def test_checkpoint_knows_nothing_of_the_engine():
    tree = ast.parse((PKG / "checkpoint.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not [m for m in imported if m.startswith("grass_cli.engine")]


def test_the_library_never_imports_the_cli():
    cli = {"grass_cli.cli", "grass_cli.__main__"} | {n for n in NAMES if ".commands" in n}
    for name, path in NAMES.items():
        if name in cli:
            continue
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not (node.module in cli or node.module.startswith("grass_cli.commands")), (
                    f"{name} imports {node.module}"
                )
