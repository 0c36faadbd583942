"""The code is formatted by ``ruff format`` and passes ``ruff check`` with the rules chosen in
pyproject.toml (``[tool.ruff.lint]``), with no finding.

The habits are checked here rather than written down: an unsorted import, an unused name, a
`# noqa` that suppresses nothing or a file the formatter would rewrite fails the suite with its
file and line. Run ``ruff format . && ruff check --fix .`` to mend most of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")  # the pinned one, from the test extra


def ruff(*args: str) -> subprocess.CompletedProcess:
    if not RUFF.exists():
        pytest.fail(f"{RUFF} is missing: install the test extra (make venv)")
    return subprocess.run(
        [str(RUFF), *args, "--no-cache", str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_check_finds_nothing() -> None:
    result = ruff("check", "--output-format", "concise")
    assert result.returncode == 0, f"ruff check found:\n{result.stdout}{result.stderr}"


def test_every_file_is_formatted() -> None:
    result = ruff("format", "--check")
    assert result.returncode == 0, f"ruff format would rewrite:\n{result.stdout}{result.stderr}"


def test_the_check_fails_on_a_finding(tmp_path: Path) -> None:
    # The same configuration finds an unused import and an unformatted line in a file beside it.
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = {  'a':1 }\n")
    config = ["--config", str(ROOT / "pyproject.toml")]
    checked = subprocess.run(
        [str(RUFF), "check", *config, "--no-cache", str(bad)], capture_output=True, text=True
    )
    formatted = subprocess.run(
        [str(RUFF), "format", "--check", *config, "--no-cache", str(bad)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1 and "F401" in checked.stdout
    assert formatted.returncode == 1 and "bad.py" in formatted.stdout


#: Where the project's code is; each is walked for dataclasses and for the calls that build them.
SOURCES = ("dp_model", "pacs_node", "transforms", "tests", "benchmarks")


def _dataclass_widths(tree: ast.Module) -> dict[str, int]:
    """Class name -> init fields declared, for the classes of one module (0: not a dataclass)."""
    widths: dict[str, int] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        fields = [
            s
            for s in node.body
            if isinstance(s, ast.AnnAssign)
            and isinstance(s.target, ast.Name)
            and not {"ClassVar", "KW_ONLY"} & set(ast.unparse(s.annotation).split("."))
            and "ClassVar[" not in ast.unparse(s.annotation)
        ]
        dataclass = any(ast.unparse(d).split(".")[-1] == "dataclass" for d in decorators)
        widths[node.name] = max(widths.get(node.name, 0), len(fields) if dataclass else 0)
    return widths


def test_a_wide_dataclass_is_built_by_keyword() -> None:
    """A dataclass of six or more fields takes at most two leading values by position (a
    record's image and labels, a destination's URL): a longer row of bare values reads as
    nothing at the call and is silently reassigned when the fields are reordered. Such a
    class is ``kw_only``, or has a ``KW_ONLY`` marker after its leading fields. A name is the
    class of that name in the calling module, else the widest of that name elsewhere."""
    trees = {
        path: ast.parse(path.read_text(encoding="utf-8"), str(path))
        for folder in SOURCES
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    local = {path: _dataclass_widths(tree) for path, tree in trees.items()}
    widest: dict[str, int] = {}
    for widths in local.values():
        for name, width in widths.items():
            widest[name] = max(widest.get(name, 0), width)
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {name}(...) with {len(node.args)} positional values"
        for path, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and len(node.args) > 2
        and (name := ast.unparse(node.func).split(".")[-1])
        and local[path].get(name, widest.get(name, 0)) >= 6
    ]
    assert not found, "\n".join(found)
