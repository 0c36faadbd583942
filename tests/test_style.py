"""The code is formatted by ``ruff format`` and passes ``ruff check`` with the rules chosen in
pyproject.toml (``[tool.ruff.lint]``), with no finding.

The habits are checked here rather than written down: an unsorted import, an unused name, a
`# noqa` that suppresses nothing or a file the formatter would rewrite fails the suite with its
file and line. Run ``ruff format . && ruff check --fix .`` to mend most of them.
"""

from __future__ import annotations

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
