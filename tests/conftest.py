"""Shared fixtures and test-wide settings."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import data_file
from pydicom import config as pydicom_config

# Strict when writing, as the project's outputs must be: an invalid value raises in tests.
pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE

ROOT = Path(__file__).resolve().parents[1]
#: torch's own thread count, before an xdist worker lowers it (the demo bundle trains with it).
THREADS: list[int] = []


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 3``), one thread per worker for torch and
    for every OpenMP runtime loaded later (scikit-learn's) and in the processes the tests
    start: three workers of two threads each on two cores wait on each other more than they
    compute, and an OpenMP team spins while it waits (a 1 s gradient-boosting fit took 40 s)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        THREADS.append(torch.get_num_threads())
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # torch read it already; the others read it now


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that need the trained demo bundle ``bundle`` (``make test-fast`` leaves
    them out); under xdist, hand out the longest files first. ``--dist loadfile`` hands out
    files in this order, so that the workers end together, rather than one worker running
    the viewer's or the worklist's minute alone at the end (longest first: the classic
    scheduling rule for two machines). A file's seconds come from ``tests/durations.json``
    (the summed test times of a recent ``make test``; a file not listed counts as short)."""
    for item in items:
        if "demo_bundle" in getattr(item, "fixturenames", ()):
            item.add_marker("bundle")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        seconds = json.loads((ROOT / "tests" / "durations.json").read_text())
        # stable: the order within a file is kept
        items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))


@pytest.fixture(scope="module")
def cluster():
    """A throwaway PostgreSQL cluster for a test module (tests/postgres_support.py)."""
    from postgres_support import postgres

    with postgres() as started:
        yield started


@pytest.fixture(scope="session")
def rg1_path() -> Path:
    """RG1_UNCR.dcm: a real PA chest CR, 1955 x 1841, 15-bit, MONOCHROME1."""
    return data_file("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def demo_bundle(request: pytest.FixtureRequest) -> Path:
    """The embedded default: demo phantoms (configs/synth_demo.yaml) and the bundle of configs/demo.yaml.

    Trained once per content of what makes it (:func:`demo_bundle_key`) into the pytest cache
    (``.pytest_cache/d/demo-bundle-KEY``), under a file lock: the xdist workers of one run
    share one training, and a later run of unchanged code trains nothing. Set
    ``DP_TEST_BUNDLE`` to an existing demo bundle (``make run`` writes runs/demo/bundle) to use
    that one instead.
    """
    if os.environ.get("DP_TEST_BUNDLE"):
        return Path(os.environ["DP_TEST_BUNDLE"]).resolve()
    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("demo-bundles"))
    else:  # -p no:cacheprovider: the folder above the workers' temporary folders, this run only
        cache = request.getfixturevalue("tmp_path_factory").getbasetemp().parent / "demo-bundles"
        cache.mkdir(exist_ok=True)
    with (cache / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait here while one trains
        root = cache / demo_bundle_key()
        if not (root / "bundle").is_dir():
            for stale in cache.iterdir():  # another content's bundle (and its 100 MB of phantoms)
                if stale.is_dir():
                    shutil.rmtree(stale)
            building = cache / f".building-{os.getpid()}"
            _train_demo_bundle(building)
            building.rename(root)  # last: an interrupted training is trained again, never used
    return root / "bundle"


def demo_bundle_key() -> str:
    """What the demo bundle is a function of: its two configs, the code that generates the
    phantoms and trains (dp_model, transforms) and the versions of the numeric stack."""
    import monai
    import numpy
    import sklearn
    import torch

    digest = hashlib.sha256(
        f"{torch.__version__} {monai.__version__} {numpy.__version__} {sklearn.__version__}".encode()
    )
    files = [ROOT / "configs" / "synth_demo.yaml", ROOT / "configs" / "demo.yaml"]
    for folder in ("dp_model", "transforms"):
        files += sorted(
            path for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".json", ".yaml")
        )
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _train_demo_bundle(root: Path) -> None:
    """Phantoms into ``root / "data"``, the bundle of configs/demo.yaml into ``root / "bundle"``."""
    import torch

    from dp_model.config import load_config
    from dp_model.synth import SynthConfig, generate
    from dp_model.training.cli import main as train_main

    shutil.rmtree(root, ignore_errors=True)
    configs = ROOT / "configs"
    generate(load_config(SynthConfig, configs / "synth_demo.yaml"), root / "data", progress=False)
    threads = torch.get_num_threads()
    # as `make run` trains it: its figures depend on it
    torch.set_num_threads(THREADS[0] if THREADS else threads)
    try:
        code = train_main(
            [
                "--config",
                str(configs / "demo.yaml"),
                "--data",
                str(root / "data"),
                "--out",
                str(root / "bundle"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, "dp-train failed on the demo config"


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


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 synthetic radiographs of 96 px, the five classes alike, once per test module that
    trains on them (tiny runs: tests/training_support.py)."""
    from dp_model.synth import Difficulty, SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    config = SynthConfig(
        num_images=90,
        size=96,
        workers=1,
        class_weights=(1.0, 1.0, 1.0, 1.0, 1.0),
        difficulty=Difficulty(label_noise=0.0),
    )
    generate(config, root, progress=False)
    return root
