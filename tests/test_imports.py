"""The project's modules import each other without a circle.

A circle between modules works only in the import order that happens to be tried first, and
is usually hidden behind a module-level ``__getattr__`` or a function-level import. This test
reads every module of the installed packages with :mod:`ast` (nothing is imported), builds
the graph of module-level imports between project modules and names any cycle it finds.
Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so an import also
leads to the packages above the module it names (those above the importer itself have
started already and are not imported again). Packages are found by walking the source
folders, so new modules are checked without editing this file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The project's packages, by import name, and their source folders.
PACKAGES = {"dp_model": "dp_model", "pacs_node": "pacs_node"}


def _source_folders() -> dict[str, Path]:
    """Import name -> folder, with the renames of ``[tool.setuptools] package-dir`` applied."""
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    renamed = settings.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    folders = {name: ROOT / folder for name, folder in PACKAGES.items()}
    folders |= {name: ROOT / folder for name, folder in renamed.items() if name and "." not in name}
    return folders


def project_modules(folders: dict[str, Path] | None = None) -> dict[str, Path]:
    """Every module of the packages in ``folders`` (import name -> folder; default: the
    project's): dotted name -> file."""
    modules = {}
    for package, folder in (folders or _source_folders()).items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts or any(not p.isidentifier() for p in parts):
                continue
            is_package = parts[-1] == "__init__"
            dotted = ".".join((package, *(parts[:-1] if is_package else parts)))
            modules[dotted] = path
    return modules


def _module_level(body: list[ast.stmt]):
    """Import statements run when the module is imported, or when one of its names is looked
    up: not those inside functions (but those of a module ``__getattr__``, PEP 562, whose
    names are the module's), nor those under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):  # a class body runs at import
            yield from _module_level(node.body)


def _packages_above(name: str) -> list[str]:
    """``a`` and ``a.b`` for ``a.b.c``: the packages whose ``__init__`` importing it runs first."""
    parts = name.split(".")
    return [".".join(parts[:cut]) for cut in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` imports at module level, with the packages
    above each of them, except the packages above ``name`` (already started when it runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _module_level(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import x`` imports the module pkg.x when there is one, else pkg itself.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        found |= {t for t in targets if t in modules and t != name}
    started = {*_packages_above(name), name}
    found |= {p for t in set(found) for p in _packages_above(t) if p in modules} - started
    return found


def import_graph(folders: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = project_modules(folders)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walk_finds_every_package_and_relative_imports() -> None:
    graph = import_graph()
    assert {
        "dp_model.serving.contract",
        "dp_model.training.engine",
        "dp_transforms",
        "pacs_node.node",
    } <= set(graph)
    assert "dp_model.config" in graph["dp_model.training.config"]  # from ..config import require
    assert "dp_transforms" in graph["dp_model.serving.inference"] or any(
        m.startswith("dp_transforms") for m in graph["dp_model.serving.inference"]
    )


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per knot of mutually importing modules (strongly connected component)."""
    reach = {node: _reachable(graph, node) for node in graph}
    knots = {
        frozenset(n for n in graph if start in reach[n] and n in reach[start])
        for start in graph
        if start in reach[start]
    }
    return sorted(find_cycle({n: graph[n] & knot for n in knot}) for knot in knots)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_find_cycle_names_the_modules_of_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert all_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "e"}, "e": set()}) == [
        ["a", "b", "a"],
        ["c", "d", "c"],
    ]


def test_a_circle_through_a_package_init_is_found_and_a_package_importing_its_own_modules_is_not(
    tmp_path: Path,
) -> None:
    # alpha imports fake.beta.gamma, which runs fake/beta/__init__.py first, which imports
    # alpha: a circle that no import statement names end to end. beta's __init__ importing its
    # own gamma, and gamma its sibling delta, is no circle (beta has started when they run).
    files = {
        "fake/__init__.py": "",
        "fake/alpha.py": "from fake.beta.gamma import g\n\na = g\n",
        "fake/beta/__init__.py": "from .gamma import g\nfrom fake.alpha import a\n",
        "fake/beta/gamma.py": "from .delta import d\n\ng = d\n",
        "fake/beta/delta.py": "d = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    graph = import_graph({"fake": tmp_path / "fake"})
    assert graph["fake.alpha"] == {"fake.beta", "fake.beta.gamma"}
    assert graph["fake.beta.gamma"] == {"fake.beta.delta"}
    assert all_cycles(graph) == [["fake.alpha", "fake.beta", "fake.alpha"]]
    # and Python agrees: the circle fails on import
    result = subprocess.run(
        [sys.executable, "-c", "import fake.alpha"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "partially initialized module 'fake.alpha'" in result.stderr, result.stderr[-500:]


def test_no_module_imports_itself_through_others() -> None:
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_cross_reference_in_a_docstring_names_something_that_exists() -> None:
    # A module moved without its references (``pacs_node.predictor`` after the model/ folder)
    # leaves docstrings that send a reader to a file that is not there.
    import importlib
    import re

    pattern = re.compile(
        r":(?:class|func|mod|meth|data|attr|exc):`~?((?:pacs_node|dp_model|dp_transforms)\.[\w.]+)`"
    )
    stale = []
    for folder in ("pacs_node", "dp_model", "transforms"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in pattern.findall(path.read_text()):
                parts = name.split(".")
                for cut in range(len(parts), 0, -1):
                    try:
                        found = importlib.import_module(".".join(parts[:cut]))
                    except ImportError:
                        continue
                    try:
                        for attribute in parts[cut:]:
                            found = getattr(found, attribute)
                    except AttributeError:
                        stale.append(f"{path.relative_to(ROOT)}: {name}")
                    break
                else:
                    stale.append(f"{path.relative_to(ROOT)}: {name}")
    assert not stale, "\n".join(stale)
