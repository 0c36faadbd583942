"""A new user's first hour: quick help, errors that say what to do, logs that read true."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run_tool
from node_support import (
    audit_lines,
    chest_dataset,
    final_lines,
    send,
    start_node,
    wait_for,
    write_raw,
)

ROOT = Path(__file__).resolve().parents[1]

# --- --help ------------------------------------------------------------------------------------------

#: Every command a user is told about, as a module run with ``python -m``.
COMMANDS = [
    ("pacs_node.cli", []),
    ("dp_model.training.cli", []),
    ("dp_model.training.cli", ["evaluate"]),
    ("dp_model.training.cli", ["ablation"]),
    ("dp_model.synth.cli", []),
    ("pacs_node.health", []),
    ("pacs_node.results.gallery", []),
]
#: What takes seconds to import on a 2-core machine; --help must not wait for it (pydicom
#: alone takes a fifth of a second: dp-synth's package brings it, and that is allowed).
HEAVY = ("torch", "monai", "torchvision", "pynetdicom", "highdicom", "matplotlib", "scipy")

PROBE = f"""
import runpy, sys
module, args = sys.argv[1], sys.argv[2:]
sys.argv = [module, *args, "--help"]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code
else:
    code = None
print("HEAVY:" + ",".join(name for name in {HEAVY!r} if name in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(("module", "args"), COMMANDS, ids=[" ".join([m, *a]) for m, a in COMMANDS])
def test_every_command_prints_its_usage_without_importing_the_heavy_stack(
    module: str, args: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    heavy = result.stderr.strip().splitlines()[-1]
    assert heavy == "HEAVY:", f"{module} --help imported {heavy[6:]} before parsing its arguments"


# --- errors that say what to do ----------------------------------------------------------------------


@pytest.fixture
def busy_port():
    """A port another program listens on (as a second dp-node would)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the node gets as far as loading its model (eight seconds on two cores)."""
    import pacs_node.node

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the ports were checked")

    monkeypatch.setattr(pacs_node.node.Node, "__init__", refuse)


def _node_args(tmp_path: Path, **options: object) -> list[str]:
    options = {
        "bundle": str(_bundle(tmp_path)),
        "spool": str(tmp_path / "spool"),
        "port": 0,
        "metrics_port": 0,
    } | options
    return [
        arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))
    ]


def _bundle(tmp_path: Path) -> Path:
    """A folder that passes for a bundle until its model is read."""
    (tmp_path / "bundle" / "configs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bundle" / "configs" / "metadata.json").write_text("{}")
    return tmp_path / "bundle"


@pytest.mark.parametrize(
    ("option", "flag"), [("port", "--port"), ("metrics_port", "--metrics-port")]
)
def test_a_port_in_use_is_named_with_its_flag_before_the_model_loads(
    option: str,
    flag: str,
    busy_port: int,
    no_model: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    from pacs_node.cli import main

    assert main(_node_args(tmp_path, **{option: busy_port})) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"port {busy_port}" in err
        and "in use" in err
        and flag in err
        and option in err
    )


def test_the_same_port_for_dicom_and_metrics_is_caught_before_the_model_loads(
    no_model: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from node_support import free_port

    from pacs_node.cli import main

    port = free_port()
    assert main(_node_args(tmp_path, port=port, metrics_port=port)) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "--metrics-port" in err


def test_dp_node_on_a_port_in_use_exits_2_with_one_line_at_once(
    busy_port: int, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "pacs_node.cli", *_node_args(tmp_path, port=busy_port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.startswith("dp-node: ")
        and result.stderr.count("\n") == 1
        and f"port {busy_port}" in result.stderr
        and "--port" in result.stderr
    )


def test_a_bundle_that_does_not_exist_is_called_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dp_model.training.cli import main as train_main
    from pacs_node.cli import main as node_main

    missing = tmp_path / "no-such-bundle"
    assert node_main(_node_args(tmp_path, bundle=missing)) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and str(missing) in err
        and "does not exist" in err
        and "--bundle" in err
    )
    assert train_main(["evaluate", "--bundle", str(missing), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and str(missing) in err
        and "does not exist" in err
        and "--bundle" in err
    )


@pytest.mark.parametrize(
    "command", [["--out", "OUT"], ["evaluate", "--bundle", "BUNDLE"]], ids=["train", "evaluate"]
)
def test_a_folder_that_is_no_dataset_names_the_layout_option_and_its_values(
    command: list[str], demo_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dp_model.datasets import LAYOUTS
    from dp_model.training.cli import main as train_main

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    command = [
        str(demo_bundle) if a == "BUNDLE" else str(tmp_path / "out") if a == "OUT" else a
        for a in command
    ]
    assert train_main([*command, "--data", str(tmp_path / "photos")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--layout" in err and all(name in err for name in LAYOUTS), err


def test_the_layouts_listed_in_the_help_are_the_readers_layouts() -> None:
    from dp_model.datasets import LAYOUTS
    from dp_model.training.cli import LAYOUT_NAMES

    assert LAYOUT_NAMES.replace(" or ", ", ").split(", ") == list(LAYOUTS)


# --- quiet, truthful logs -----------------------------------------------------------------------------


@pytest.mark.tools
def test_storescu_proposing_every_storage_class_gives_one_short_line_and_counts_each_class_once(
    node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pacs_node.intake.listener")
    image = write_raw(chest_dataset(), tmp_path / "chest.dcm")
    for _ in range(2):
        run_tool("storescu", "-aet", "STORESCU", "-aec", "DPNODE", "127.0.0.1", node.port, image)

    def refusals() -> list[dict]:
        found = [
            x
            for x in audit_lines(node)
            if x["event"] == "association" and x["status"] == "contexts-refused"
        ]
        return found if len(found) == 2 else []

    lines = wait_for(refusals, 10, "both associations' refusal lines")
    refused = lines[0]["contexts"]
    assert len(refused) > 20 and len(set(refused)) == len(refused), "each refused SOP class once"
    assert node.metrics.value("contexts_refused_total") == 2 * len(refused)
    info = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and "refused" in r.getMessage()
    ]
    assert len(info) == 2 and all(len(m) < 250 and str(len(refused)) in m for m in info), info
    assert not any(name in info[0] for name in refused), "the list is for DEBUG"
    listed = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.DEBUG and refused[0] in r.getMessage()
    ]
    assert len(listed) == 1, "the list once per peer, not once per association"


class NeverAssessed:
    """The real predictor, with every image found outside the training distribution."""

    def __init__(self, inner) -> None:
        self.inner, self.contract = inner, inner.contract

    def predict(self, prepared):
        return [
            dataclasses.replace(p, ood_score=math.inf, ood_threshold=1.0)
            for p in self.inner.predict(prepared)
        ]


def test_an_image_not_assessed_is_logged_and_audited_without_a_probability(
    predictor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pacs_node")
    node = start_node(tmp_path, NeverAssessed(predictor))
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [0]
        (line,) = wait_for(lambda: final_lines(node, "processed"), 60, "the image to be processed")
    finally:
        node.stop()
    assert line["result"]["assessed"] is False and "pneumonia_probability" not in line["result"], (
        line["result"]
    )
    assert not any("probab" in key for key in line["result"])
    (message,) = [
        r.getMessage()
        for r in caplog.records
        if ds.SOPInstanceUID in r.getMessage() and "not assessed" in r.getMessage()
    ]
    assert "%" not in message and "pneumonia" not in message, message
    assert node.metrics.value("processed_total", outcome="not-assessed") == 1


def test_the_bundle_runner_states_no_probability_for_an_image_it_does_not_assess(
    demo_bundle: Path, rg1_path: Path, tmp_path: Path
) -> None:
    import csv
    import shutil

    from dp_model.serving.inference import Predictor

    (tmp_path / "in").mkdir()
    # a real radiograph: outside the demonstration model's phantoms
    shutil.copy(rg1_path, tmp_path / "in" / "rg1.dcm")
    for sample in sorted((demo_bundle / "samples").glob("*.dcm"))[:1]:
        shutil.copy(sample, tmp_path / "in")
    rows = list(
        csv.reader(
            (
                Predictor(str(demo_bundle)).predict_folder(
                    str(tmp_path / "in"), str(tmp_path / "out")
                )
            ).open()
        )
    )
    judged = {row[1] == "not assessed": row[2:] for row in rows[1:]}
    assert set(judged) == {True, False}
    assert all(cell == "" for cell in judged[True]) and all(cell != "" for cell in judged[False])


# --- the training log and the model card ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dp_model.synth import Difficulty, SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    generate(
        SynthConfig(
            num_images=60,
            size=64,
            workers=1,
            class_weights=(1.0,) * 5,
            difficulty=Difficulty(label_noise=0.0),
        ),
        root,
        progress=False,
    )
    return root


@pytest.mark.slow
def test_the_training_log_names_each_split_and_announces_the_plain_baseline(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dp_model.training.config import (
        DataConfig,
        FinetuneConfig,
        PretrainConfig,
        RuntimeConfig,
        TrainConfig,
    )
    from dp_model.training.run import train

    caplog.set_level(logging.INFO)
    config = TrainConfig(
        name="tiny",
        demo=True,
        data=DataConfig(
            root=str(tiny_dataset), image_size=48, cache_dir=str(tmp_path / "cache"), workers=1
        ),
        pretrain=PretrainConfig(enabled=False),
        finetune=FinetuneConfig(epochs=1, batch_size=16),
        runtime=RuntimeConfig(device="cpu", threads=2),
    )
    train(config, tmp_path / "bundle")
    messages = [r.getMessage() for r in caplog.records]
    splits = [m for m in messages if "split:" in m]
    assert len(splits) == 1 and all(
        word in splits[0] for word in ("train", "validation", "test")
    ), splits
    epochs = [i for i, m in enumerate(messages) if m.startswith("stage II ")]
    (heading,) = [i for i, m in enumerate(messages) if m.startswith("baseline: a plain ResNet18")]
    assert epochs[0] < heading < epochs[-1], (
        "the baseline's epochs come after a heading that says whose they are"
    )
    card = (tmp_path / "bundle" / "docs" / "README.md").read_text()
    metadata = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    intro = card.split("## Intended use")[0]
    assert "pre-trained with SimCLR" not in intro and "without SimCLR pre-training" in intro, (
        "stage I was off"
    )
    assert (
        "with SimCLR pre-training" not in metadata["description"]
        and "no SimCLR pre-training" in metadata["description"]
    )


def _contract(before: float, after: float) -> SimpleNamespace:
    def ece(value):
        return {
            "ece": value,
            "ece_low": value - 0.05,
            "ece_high": value + 0.1,
            "images": 47,
        }

    return SimpleNamespace(
        calibration={"test_before": ece(before), "test_after": ece(after)},
        temperature=1.165,
        operating_points={},
        multi_label=False,
        pneumonia=("lobar",),
        ood=None,
    )


def test_the_card_says_so_when_calibration_made_the_test_error_worse() -> None:
    from dp_model.training.card import calibration_section

    worse = "\n".join(calibration_section(_contract(0.145, 0.174), {}, None))
    assert "did not help" in worse and "0.145" in worse and "0.174" in worse
    better = "\n".join(calibration_section(_contract(0.174, 0.145), {}, None))
    assert "did not help" not in better


def test_the_repository_carries_the_licence_its_package_declares() -> None:
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
