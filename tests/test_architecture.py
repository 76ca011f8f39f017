"""The shape of the house, checked from the source (AST only: nothing is imported or run).

- No import cycle inside ``edge_magistral/``: module-level and function-level imports, and those
  under ``if TYPE_CHECKING:`` (a cycle of annotations is still a cycle of design). ``from P import m``
  where ``m`` is a submodule is an edge to ``P.m``; the implicit import of a parent package is not
  an edge (a package ``__init__`` that re-exports its submodules would otherwise always be a cycle).
- The server never imports the CLI; the CLI reaches the server only through the public names of
  the package ``edge_magistral.server``.
- No module uses another package's private (``_name``) functions.
- Size: no module over 500 lines, no function over 80 (data tables named in an allow-list).
- The repository is self-contained: no file cites documents outside it.

Run ``python tests/test_architecture.py`` for the import graph's cycles and the private uses.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "edge_magistral"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# Functions that are data tables (one literal, not logic), allowed to be long: "module:function".
# Empty: the unit file, the longest table, renders in sections that each fit.
LONG_DATA_FUNCTIONS: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Import:
    """One import statement's target as written: ``module`` and the ``names`` taken from it."""

    importer: str
    module: str  # absolute dotted name of the ``import``/``from`` target
    names: tuple[str, ...]  # names of ``from module import a, b``; () for ``import module``
    line: int


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every import statement anywhere in the module (functions and ``if`` blocks included)."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield Import(name, a.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield Import(name, base, tuple(a.name for a in node.names), node.lineno)


def targets(imp: Import, modules: dict[str, Path]) -> set[str]:
    """The package's modules an import makes its importer depend on."""
    if not (imp.module == PACKAGE or imp.module.startswith(PACKAGE + ".")):
        return set()
    out = set()
    if imp.names:
        for n in imp.names:
            sub = f"{imp.module}.{n}"
            out.add(sub if sub in modules else imp.module)
    else:
        out.add(imp.module)
    resolved = set()
    for t in out:
        while t not in modules and "." in t:  # `import a.b.attr`-like: the deepest real module
            t = t.rpartition(".")[0]
        if t in modules:
            resolved.add(t)
    return resolved


def import_graph() -> dict[str, dict[str, int]]:
    """{importer: {imported module: first line}} within the package."""
    modules = module_files()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            for t in targets(imp, modules):
                if t != name:
                    graph[name].setdefault(t, imp.line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe(comp: list[str], graph: dict[str, dict[str, int]]) -> str:
    """A component's edges with their line numbers: what to cut."""
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in comp]
    return "cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(edges)


# --------------------------------------------------------------------------- private names


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _package_of(name: str, modules: dict[str, Path]) -> str:
    return name if _is_package(name, modules) else name.rpartition(".")[0]


def private_uses() -> list[tuple[str, str, str, int]]:
    """(importer, module, private name, line) for each ``from M import _x`` and each ``M._x`` where
    ``M`` is a module of the package bound by an import."""
    modules = module_files()
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        bound: dict[str, str] = {}  # local name -> module of the package
        for imp in imports_of(name, path, modules):
            if not _in(imp.module, PACKAGE):
                continue
            for n in imp.names:
                sub = f"{imp.module}.{n}"
                if sub in modules:
                    bound[n] = sub
                elif n.startswith("_") and not n.startswith("__"):
                    out.append((name, imp.module, n, imp.line))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in modules:
                        bound[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.asname and a.name in bound:
                        bound[a.asname] = bound.pop(a.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_") and not node.attr.startswith("__")):
                out.append((name, bound[node.value.id], node.attr, node.lineno))
    return sorted(set(out))


def cross_package_private_uses() -> list[tuple[str, str, str, int]]:
    modules = module_files()
    return [u for u in private_uses() if _package_of(u[0], modules) != _package_of(u[1], modules)]


# ------------------------------------------------------------------------------------- tests


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "\n".join(describe(c, graph) for c in found)


def test_the_checker_sees_cycles_through_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The graph itself: a function-level import and a relative one close a cycle."""
    modules = {"edge_magistral.a": tmp_path / "a.py", "edge_magistral.b": tmp_path / "b.py",
               "edge_magistral.pkg": tmp_path / "pkg" / "__init__.py", "edge_magistral.pkg.c": tmp_path / "c.py"}
    src = {"edge_magistral.a": "def f():\n    from edge_magistral import b\n",
           "edge_magistral.b": "from edge_magistral.pkg import c\n",
           "edge_magistral.pkg": "from .c import x\n",
           "edge_magistral.pkg.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from ..a import thing\n"}
    for m, p in modules.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src[m])
    graph = {m: {t: i.line for i in imports_of(m, p, modules) for t in targets(i, modules) if t != m}
             for m, p in modules.items()}
    assert graph["edge_magistral.a"] == {"edge_magistral.b": 2}
    assert graph["edge_magistral.pkg"] == {"edge_magistral.pkg.c": 1}
    assert cycles(graph) == [["edge_magistral.a", "edge_magistral.b", "edge_magistral.pkg.c"]]


def test_the_server_never_imports_the_cli() -> None:
    graph = import_graph()
    bad = [f"{a} -> {b} (line {line})" for a, deps in graph.items() if _in(a, f"{PACKAGE}.server")
           for b, line in deps.items() if _in(b, f"{PACKAGE}.cli")]
    assert not bad, "\n".join(bad)


def test_the_cli_uses_only_the_public_server_package() -> None:
    modules = module_files()
    server = f"{PACKAGE}.server"
    bad = []
    for name, path in modules.items():
        if not _in(name, f"{PACKAGE}.cli"):
            continue
        for imp in imports_of(name, path, modules):
            for t in targets(imp, modules):
                if _in(t, server) and t != server:
                    bad.append(f"{name} line {imp.line}: imports the submodule {t}")
            if imp.module == server:
                bad += [f"{name} line {imp.line}: imports the private {server}.{n}"
                        for n in imp.names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_no_module_uses_another_packages_private_names() -> None:
    bad = [f"{a} line {line}: {m}.{n}" for a, m, n, line in cross_package_private_uses()]
    assert not bad, "\n".join(bad)


def test_modules_are_at_most_500_lines() -> None:
    long = {m: n for m, p in module_files().items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def function_lengths() -> Iterator[tuple[str, int]]:
    for m, p in module_files().items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                yield f"{m}:{node.name}", node.end_lineno - first + 1


def test_functions_are_at_most_80_lines() -> None:
    long = {f: n for f, n in function_lengths() if n > MAX_FUNCTION_LINES and f not in LONG_DATA_FUNCTIONS}
    assert not long, long


def test_the_allow_list_of_long_data_functions_is_not_stale() -> None:
    lengths = dict(function_lengths())
    stale = sorted(f for f in LONG_DATA_FUNCTIONS if lengths.get(f, 0) <= MAX_FUNCTION_LINES)
    assert not stale, f"no longer long (or gone): remove from LONG_DATA_FUNCTIONS: {stale}"


# ------------------------------------------------------------------- self-contained repository

SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".cache", ".pytest_cache", ".ruff_cache", "build", "dist",
             "node_modules", "vendor"}
TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".ini", ".service", ".json",
                 ".rst", ".in"}
OUTSIDE_DOCS = ("RELIABILITY", "DESIGN")  # documents that lived beside the repository, not in it


def repo_text_files() -> Iterator[Path]:
    for p in sorted(ROOT.rglob("*")):
        rel = p.relative_to(ROOT).parts
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel[:-1]):
            continue
        if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name in ("Makefile", "Dockerfile")):
            yield p


def outside_citations() -> list[str]:
    in_repo = {p.name for p in repo_text_files()}
    names = [d + ".md" for d in OUTSIDE_DOCS if d + ".md" not in in_repo]
    pattern = re.compile(r"\.\./shared\b" + "".join(f"|\\b{re.escape(n)}" for n in names))
    out = []
    for p in repo_text_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                out.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    return out


def test_no_file_cites_documents_outside_the_repository() -> None:
    found = outside_citations()
    assert not found, "\n".join(found)


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print(describe(c, g))
    print("private names used across packages:")
    for a, m, n, line in cross_package_private_uses():
        print(f"  {a} line {line}: {m}.{n}")
    print("private names used within a package:")
    cross = set(cross_package_private_uses())
    for u in private_uses():
        if u not in cross:
            print(f"  {u[0]} line {u[3]}: {u[1]}.{u[2]}")
