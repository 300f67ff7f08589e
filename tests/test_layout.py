"""The package's layout: no import cycle anywhere (imports inside functions included), the
package's top imported by its own modules only for the compiled ``_native``, and
``import hiddenpool`` free of torch, transformers and onnxruntime. The layers themselves
are import-linter's contracts in pyproject.toml (``lint-imports`` in ``make test``)."""

from __future__ import annotations

import ast
import pathlib
import re
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


# Sizes a reader can hold in mind (the house issue): a module of at most 600 lines, a
# function of at most 100 (docstring included), in the package; tests and benches aside.
MODULE_LINES = 600
FUNCTION_LINES = 100


def _sizes() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    modules, functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = str(path.relative_to(PACKAGE))
        modules.append((name, len(source.splitlines())))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                functions.append((f"{name}:{node.name}", node.end_lineno - first + 1))  # type: ignore[operator]
    return modules, functions


def test_no_module_or_function_is_too_long() -> None:
    modules, functions = _sizes()
    assert len(modules) > 40 and len(functions) > 300  # the walk found the package
    assert [(name, n) for name, n in modules if n > MODULE_LINES] == []
    assert [(name, n) for name, n in functions if n > FUNCTION_LINES] == []


RUST = PACKAGE.parents[1] / "rust" / "src"


def _rust_modules() -> dict[str, set[str]]:
    """Each Rust module of the crate (``kernels::pool``, ``kernels::pool::job``) and the
    modules of the crate it names in its code: ``use``/paths through ``super::`` and
    ``crate::``, resolved to the module (an item's path ends at its module). Tests aside."""
    files = {}
    for path in sorted(RUST.rglob("*.rs")):
        parts = list(path.relative_to(RUST).with_suffix("").parts)
        if parts[-1] in ("mod", "lib"):
            parts = parts[:-1]
        if parts and parts[-1] == "tests":
            continue
        files["::".join(parts)] = path.read_text(encoding="utf-8")
    graph: dict[str, set[str]] = {}
    for module, source in files.items():
        source = source.split("#[cfg(test)]\nmod tests {", 1)[0]
        here = module.split("::") if module else []
        named: set[str] = set()
        for match in re.finditer(r"\b((?:super::)+|crate::)((?:\w+::)*\w+)", source):
            prefix, rest = match.group(1), match.group(2).split("::")
            if prefix == "crate::":
                base: list[str] = []
            else:
                base = here[: len(here) - prefix.count("super::")]
            path = base + rest
            # The longest prefix that is a module of the crate.
            while path and "::".join(path) not in files:
                path = path[:-1]
            target = "::".join(path)
            if path and target != module and not module.startswith(target + "::"):
                named.add(target)
        graph[module] = named
    return graph


def _rust_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (a module using its own parent's
    items, as every submodule does through ``super::``, is not counted: parents hold their
    children)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def test_no_cycle_among_the_rust_modules() -> None:
    graph = _rust_modules()
    assert {"kernels::element", "kernels::pool", "kernels::accumulator"} <= set(graph)
    assert "kernels::accumulator" in graph["kernels::element"]  # the walk reads the uses
    assert _rust_cycles(graph) == []
    # The finder finds a circle when there is one.
    assert _rust_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
