"""The package's layout: no import cycle anywhere (imports inside functions included), the
package's top imported by its own modules only for the compiled ``_native``, and
``import hiddenpool`` free of torch, transformers and onnxruntime. The layers themselves
are import-linter's contracts in pyproject.toml (``lint-imports`` in ``make test``)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import grimp
import pytest

import hiddenpool

PACKAGE = pathlib.Path(hiddenpool.__file__).parent


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm), as a
    sorted list of names; an import of a package by one of its own submodules counts."""
    modules = sorted(m for m in graph.modules if m.startswith("hiddenpool"))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0

    def visit(module: str) -> None:
        nonlocal counter
        # An explicit stack would be needed for deep graphs; this package is ~60 modules.
        index[module] = low[module] = counter
        counter += 1
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith("hiddenpool"):
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    return groups


def test_no_import_cycle_in_the_package() -> None:
    graph = grimp.build_graph("hiddenpool")
    # The package's top imports its public names from below; grimp reads the compiled
    # `_native` as the top itself, so edges into the top are taken out here and checked
    # on their own in the test below.
    for module in list(graph.modules):
        if module.startswith("hiddenpool.") and graph.direct_import_exists(
            importer=module, imported="hiddenpool"
        ):
            graph.remove_import(importer=module, imported="hiddenpool")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("hiddenpool", "hiddenpool.a", "hiddenpool.b", "hiddenpool.c"):
        graph.add_module(name)
    graph.add_import(importer="hiddenpool.a", imported="hiddenpool.b")
    graph.add_import(importer="hiddenpool.b", imported="hiddenpool.c")
    graph.add_import(importer="hiddenpool.c", imported="hiddenpool.a")
    assert _cycles(graph) == [["hiddenpool.a", "hiddenpool.b", "hiddenpool.c"]]


def _imports_of_the_top(path: pathlib.Path) -> list[str]:
    """What a module takes from the package's top: names of ``from hiddenpool import X``,
    and ``hiddenpool`` itself for ``import hiddenpool``."""
    taken: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "hiddenpool" and node.level == 0:
            taken += [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            taken += [alias.name for alias in node.names if alias.name == "hiddenpool"]
    return taken


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" or p.parent != PACKAGE],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_modules_take_only_native_or_submodules_from_the_top(path: pathlib.Path) -> None:
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    taken = _imports_of_the_top(path)
    assert [name for name in taken if name != "_native" and name not in submodules] == []


def test_import_hiddenpool_loads_no_framework() -> None:
    code = (
        "import sys, hiddenpool, hiddenpool.cli, hiddenpool.sentence_transformers, "
        "hiddenpool.ray\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', "
        "'sentence_transformers', 'ray') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"
