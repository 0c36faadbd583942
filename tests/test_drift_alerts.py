"""The shipped alert rules fire on a drifted node and on one whose gate turns many images away,
and not on a node like its validation images, one whose window is still filling, or a blip:
``promtool test rules`` on recorded series (tests/prometheus/rules_test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import require_tool

ROOT = Path(__file__).resolve().parents[1]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool", "prometheus")
    return subprocess.run(
        [tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_rules_and_the_example_configuration_are_valid() -> None:
    for args in (
        ("check", "rules", "deploy/prometheus/rules.yml"),
        ("check", "config", "deploy/prometheus/prometheus.yml"),
    ):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_a_drifted_node_fires_and_a_node_like_its_validation_images_does_not() -> None:
    done = promtool("test", "rules", "tests/prometheus/rules_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
