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


def _positional_fields(node: ast.ClassDef) -> tuple[int, int] | None:
    """For a dataclass: (init fields, how many of them a call may give by position); None for
    another class. ``kw_only=True`` allows none; a ``KW_ONLY`` marker, those before it."""
    calls = [d for d in node.decorator_list if isinstance(d, ast.Call)]
    decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
    if not any(ast.unparse(d).split(".")[-1] == "dataclass" for d in decorators):
        return None
    fields, positional = 0, None
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        annotation = ast.unparse(statement.annotation)
        if annotation.split(".")[-1] == "KW_ONLY":
            positional = fields if positional is None else positional
        elif "ClassVar" not in annotation:
            fields += 1
    if any(
        k.arg == "kw_only" and isinstance(k.value, ast.Constant) and k.value.value
        for call in calls
        for k in call.keywords
    ):
        positional = 0
    return fields, fields if positional is None else positional


def wide_positional_dataclasses(trees: dict[Path, ast.Module]) -> list[str]:
    """The dataclasses of six or more fields that take more than two values by position."""
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} ({width} fields, "
        f"{positional} by position)"
        for path, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and (shape := _positional_fields(node)) is not None
        and (width := shape[0]) >= 6
        and (positional := shape[1]) > 2
    ]


def test_a_wide_dataclass_is_built_by_keyword() -> None:
    """A dataclass of six or more fields takes at most two leading values by position (a
    record's image and labels, a destination's URL): a longer row of bare values reads as
    nothing at the call and is silently reassigned when the fields are reordered. Such a
    class is declared ``kw_only``, or has a ``KW_ONLY`` marker after its leading fields, so
    that Python refuses the call, however it is spelt (``Row(*values)``, an alias)."""
    trees = {
        path: ast.parse(path.read_text(encoding="utf-8"), str(path))
        for folder in SOURCES
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    found = wide_positional_dataclasses(trees)
    assert not found, "\n".join(found)


def test_the_keyword_rule_tells_a_wide_dataclass_from_a_narrow_or_keyword_only_one() -> None:
    source = """
from dataclasses import KW_ONLY, dataclass
@dataclass
class Wide:
    a: int; b: int; c: int; d: int; e: int; f: int
@dataclass(frozen=True, kw_only=True)
class Keyworded:
    a: int; b: int; c: int; d: int; e: int; f: int
@dataclass
class Marked:
    a: int; b: int; _: KW_ONLY; c: int; d: int; e: int; f: int
@dataclass
class Narrow:
    a: int; b: int; c: int; d: int; e: int
class Plain:
    a: int; b: int; c: int; d: int; e: int; f: int
"""
    found = wide_positional_dataclasses({ROOT / "x.py": ast.parse(source)})
    assert found == ["x.py:4: Wide (6 fields, 6 by position)"]
