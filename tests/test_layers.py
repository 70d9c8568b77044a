"""The package's layers hold: the import-linter contract in pyproject.toml (io → data, models →
linalg → curvature → fl → analysis → apps, nothing imports upward), no import cycle between
modules, and a function-level import of hessrank's own modules only where a comment says why
(keeping ``hessrank --help`` free of torch, or a PEP 562 lazy name)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hessrank"


def _lint_imports() -> str:
    here = Path(sys.executable).parent / "lint-imports"
    found = str(here) if here.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: `pip install -e '.[dev]'` installs it")
    return found


def test_import_contract_is_kept():
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("hessrank", exclude_type_checking_imports=True, cache_dir=None)
    # a package's __init__ re-exporting its modules is not a cycle of the code's logic
    modules = {m for m in graph.modules if not (PACKAGE / m.replace("hessrank.", "", 1)
                                                .replace(".", "/") / "__init__.py").exists()}
    modules.discard("hessrank")
    assert _cycles(graph, modules) == []


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("a", "b", "c", "d"):
        graph.add_module(m)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    graph.add_import(importer="c", imported="d")
    assert _cycles(graph, {"a", "b", "c", "d"}) == [["a", "b", "c"]]


def _function_level_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, statement, explained) of each import of hessrank inside a function: explained
    when a comment sits on the statement or heads the block of imports it belongs to."""
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines()
    out = []
    for fn in ast.walk(ast.parse(src)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            own = (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hessrank")
                   ) or (isinstance(node, ast.Import)
                         and any(a.name.startswith("hessrank") for a in node.names))
            if own:
                out.append((node.lineno, lines[node.lineno - 1].strip(),
                            _explained(lines, node.lineno, node.end_lineno)))
    return out


def _explained(lines: list[str], first: int, last: int) -> bool:
    """A comment on the statement, or a comment line heading its block of imports."""
    if any("#" in line for line in lines[first - 1:last]):
        return True
    i = first - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            return True
        if not (text == "" or text.startswith(("import ", "from "))):
            return False
        i -= 1
    return False


def test_function_level_imports_say_why():
    unexplained = [f"{p.relative_to(ROOT)}:{line}: {stmt}"
                   for p in sorted(PACKAGE.rglob("*.py"))
                   for line, stmt, why in _function_level_imports(p) if not why]  # fmt: skip
    assert unexplained == []


def test_function_level_import_check_sees_an_unexplained_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    x = 1  # unrelated\n    from hessrank.io import atomic_write_text\n"
                 "\n\ndef g():\n    # why: keeps --help fast\n    import os\n\n"
                 "    import hessrank.io\n")
    assert [why for _, _, why in _function_level_imports(f)] == [False, True]
