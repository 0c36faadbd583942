"""The node passes mypy in strict mode (``[tool.mypy]`` in pyproject.toml), with no finding.

Types are checked where they are cheapest to keep: a wrong argument, an unhandled None or a
protocol a writer no longer meets fails here with its file and line, before any test starts
a node. mypy's incremental cache is this checkout's own ``.mypy_cache`` (ignored by git): a
second run rechecks only what changed, in seconds rather than half a minute.
"""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]


def test_the_node_package_has_no_type_errors_in_strict_mode(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the configuration and the packages are found from the project root
    # transforms/ installs as dp_transforms through an editable import hook mypy cannot follow:
    # show it the package under its installed name.
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "dp_transforms").symlink_to(ROOT / "transforms", target_is_directory=True)
    monkeypatch.setenv("MYPYPATH", str(tmp_path / "path"))
    # No targets here: the configuration's ``files`` names them.
    report, errors, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(ROOT / ".mypy_cache")]
    )
    assert status == 0 and not errors, f"mypy found:\n{report}{errors}"
