"""Helpers for tests: real DICOM test files and the Debian tools the tests talk to."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def data_file(name: str) -> Path:
    """Path of a file from pydicom's test data or the ``pydicom-data`` package."""
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found: is pydicom-data installed?")
    return Path(path)


def require_tool(name: str) -> str:
    """Path of a command-line tool; a missing tool fails in CI (make test installs it) and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian packages dcmtk / dicom3tools; `make system-deps`)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a tool; with ``check``, fail the test with its output if it exits non-zero."""
    tool = require_tool(str(args[0]))
    result = subprocess.run([tool, *map(str, args[1:])], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
