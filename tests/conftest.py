"""Shared fixtures and test-wide settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import data_file
from pydicom import config as pydicom_config

# Strict when writing, as the project's outputs must be: an invalid value raises in tests.
pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE


@pytest.fixture(scope="session")
def rg1_path() -> Path:
    """RG1_UNCR.dcm: a real PA chest CR, 1955 x 1841, 15-bit, MONOCHROME1."""
    return data_file("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default: demo phantoms (configs/synth_demo.yaml) and the bundle of configs/demo.yaml.

    Set ``DP_TEST_BUNDLE`` to an existing demo bundle (``make run`` writes runs/demo/bundle)
    to skip the two minutes of training while working on tests that only use it.
    """
    if os.environ.get("DP_TEST_BUNDLE"):
        return Path(os.environ["DP_TEST_BUNDLE"]).resolve()
    from dp_model.config import load_config
    from dp_model.synth import SynthConfig, generate
    from dp_model.train_cli import main as train_main

    root = tmp_path_factory.mktemp("demo")
    configs = Path(__file__).resolve().parents[1] / "configs"
    generate(load_config(SynthConfig, configs / "synth_demo.yaml"), root / "data", progress=False)
    code = train_main(["--config", str(configs / "demo.yaml"), "--data", str(root / "data"), "--out", str(root / "bundle")])
    assert code == 0, "dp-train failed on the demo config"
    return root / "bundle"


@pytest.fixture(scope="session")
def predictor(demo_bundle: Path):
    """The demo bundle's model as the node runs it (on the CPU), loaded once."""
    from pacs_node.model.predictor import NodePredictor

    return NodePredictor(demo_bundle, "cpu")


@pytest.fixture
def node(tmp_path: Path, predictor):
    """A running node with the test callers allowed, results written to ``tmp_path / "out"``."""
    from node_support import start_node

    running = start_node(tmp_path, predictor)
    yield running
    running.stop()
