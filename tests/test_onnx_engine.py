"""The forward pass as an ONNX graph (``models/model.onnx``): exported from a bundle's weights,
served by ONNX Runtime on the CPU with the same numbers as PyTorch, tied to the weights, and
refused in one line when it is not the bundle's own."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_engines_agree, onnx_copy
from node_support import chest_dataset, send, start_node, wait_for

from dp_model.networks.explain import CAM, grad_cam
from dp_model.networks.networks import BaselineNet, DeepPneumoniaNet
from dp_model.serving.contract import ContractError, ModelContract
from dp_model.serving.loading import BundleError
from dp_model.serving.onnx_graph import OnnxGraph, ServedGraph, export, file_digest, write_onnx
from dp_model.serving.runner import ENGINES, Runner
from pacs_node.config import ENGINES as NODE_ENGINES
from pacs_node.config import NodeConfig


@pytest.fixture(scope="module")
def onnx_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo bundle with the graph dp-train writes (the demo bundle is not changed)."""
    return onnx_copy(demo_bundle, tmp_path_factory.mktemp("onnx") / "bundle")


def _tampered(onnx_bundle: Path, folder: Path, graph: bytes | None, digest: str | None) -> Path:
    """A copy of ``onnx_bundle`` whose graph file is ``graph`` (None: absent) and whose contract
    records ``digest`` (None: no digest)."""
    folder.mkdir()
    (folder / "configs").mkdir()
    (folder / "samples").symlink_to((onnx_bundle / "samples").resolve())
    (folder / "models").mkdir()
    for item in (onnx_bundle / "models").iterdir():
        if item.name != "model.onnx":
            (folder / "models" / item.name).symlink_to(item.resolve())
    if graph is not None:
        (folder / "models" / "model.onnx").write_bytes(graph)
    meta = json.loads((onnx_bundle / "configs" / "metadata.json").read_text())
    meta["deep_pneumonia"].pop("onnx_digest", None)
    if digest is not None:
        meta["deep_pneumonia"]["onnx_digest"] = digest
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_the_demo_bundles_graph_gives_the_probabilities_maps_and_scores_of_pytorch(
    onnx_bundle: Path,
) -> None:
    assert_engines_agree(onnx_bundle)


def test_auto_serves_the_graph_on_the_cpu_and_says_so(
    onnx_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dp_model.serving.runner")
    assert Runner(bundle=onnx_bundle, device="cpu", maps=True).engine == "onnx"
    assert "model engine: ONNX Runtime on the CPU" in caplog.text
    caplog.clear()
    assert Runner(bundle=onnx_bundle, device="cpu", engine="torch").engine == "torch"
    assert "ONNX Runtime" not in caplog.text


def test_a_bundle_without_a_graph_runs_in_pytorch_and_the_onnx_engine_is_refused_in_one_line(
    demo_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a bundle written before graphs were (the demo bundle itself has one once trained today)
    plain = _tampered(demo_bundle, tmp_path / "plain", None, None)
    caplog.set_level(logging.INFO, logger="dp_model.serving.runner")
    assert Runner(bundle=plain, device="cpu", maps=True).engine == "torch"
    assert "model engine: PyTorch" in caplog.text and "no ONNX graph" in caplog.text
    with pytest.raises(
        BundleError, match=r"^[^\n]*onnx engine cannot serve: the bundle has no ONNX graph$"
    ):
        Runner(bundle=plain, device="cpu", engine="onnx")
    with pytest.raises(ValueError, match="engine 'tensorrt': use auto, torch, onnx"):
        Runner(bundle=plain, device="cpu", engine="tensorrt")


def test_a_network_of_the_callers_own_runs_in_pytorch(onnx_bundle: Path) -> None:
    """The MONAI configs hand their own network: that module is what runs."""
    network = ModelContract.from_json(
        json.loads((onnx_bundle / "configs" / "metadata.json").read_text())["deep_pneumonia"]
    ).network()
    assert Runner(bundle=onnx_bundle, device="cpu", network=network).engine == "torch"
    with pytest.raises(BundleError, match="a network of the caller's own runs in PyTorch"):
        Runner(bundle=onnx_bundle, device="cpu", network=network, engine="onnx")


@pytest.mark.parametrize("engine", ["auto", "onnx"])
def test_an_altered_graph_is_refused_in_one_line_not_replaced_by_pytorch(
    onnx_bundle: Path, tmp_path: Path, engine: str
) -> None:
    graph = (onnx_bundle / "models" / "model.onnx").read_bytes()
    digest = file_digest(onnx_bundle / "models" / "model.onnx")
    altered = _tampered(onnx_bundle, tmp_path / "altered", graph + b"\0", digest)
    unrecorded = _tampered(onnx_bundle, tmp_path / "unrecorded", graph, None)
    missing = _tampered(onnx_bundle, tmp_path / "missing", None, digest)
    for bundle, reason in (
        (altered, "its SHA-256 differs from the one metadata.json records"),
        (unrecorded, "metadata.json records no SHA-256 of it"),
        (missing, "missing, though metadata.json records its SHA-256"),
    ):
        with pytest.raises(BundleError, match=reason) as caught:
            Runner(bundle=bundle, device="cpu", maps=True, engine=engine)
        assert "\n" not in str(caught.value)
    # the engine that does not read the graph serves
    assert Runner(bundle=altered, device="cpu", engine="torch").engine == "torch"


def test_a_graph_of_other_weights_is_refused_even_with_its_digest_recorded(
    onnx_bundle: Path, tmp_path: Path
) -> None:
    """The contract's Device UID names the weights; the graph carries the UID it was exported from."""
    contract = Runner(bundle=onnx_bundle, device="cpu", engine="torch").contract
    other = DeepPneumoniaNet(num_classes=len(contract.output_classes), attention_stages=()).eval()
    path = tmp_path / "other.onnx"
    export(ServedGraph(other, None), path, contract.image_size, "2.25.1")
    bundle = _tampered(onnx_bundle, tmp_path / "other", path.read_bytes(), file_digest(path))
    with pytest.raises(
        BundleError, match=r"names the Device UID 2\.25\.1.*not these weights' graph"
    ):
        Runner(bundle=bundle, device="cpu", engine="auto")


def test_the_contract_refuses_an_onnx_digest_that_is_no_sha256_and_keeps_one_that_is(
    onnx_bundle: Path,
) -> None:
    data = json.loads((onnx_bundle / "configs" / "metadata.json").read_text())["deep_pneumonia"]
    written = ModelContract.from_json(data).to_json()
    assert written["onnx_digest"] == data["onnx_digest"]
    assert ModelContract.from_json(written).to_json() == written
    with pytest.raises(ContractError, match="onnx_digest must be the 64 hex digits"):
        ModelContract.from_json(data | {"onnx_digest": "abc"})
    without = {k: v for k, v in data.items() if k != "onnx_digest"}
    assert "onnx_digest" not in ModelContract.from_json(without).to_json()


def test_grad_cam_of_a_network_where_cam_is_exact_is_drawn_as_cam_by_the_graph(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = DeepPneumoniaNet(num_classes=3, attention_stages=()).eval()
    path = tmp_path / "cam.onnx"
    graph = ServedGraph(model, CAM)
    export(graph, path, 64, "2.25.1")
    x = torch.rand(3, 1, 64, 64)
    found = OnnxGraph(path, threads=1).run(x.numpy())
    np.testing.assert_allclose(
        found["maps"], grad_cam(model, x, model.cam_layer).numpy(), rtol=0, atol=1e-4
    )
    assert found["maps"].shape == (3, 1, 64, 64) and found["logits"].shape == (3, 3)


def test_no_graph_is_written_where_the_maps_need_gradients(
    demo_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DenseNet-121's Grad-CAM: no inference graph can draw it, so its bundle runs in PyTorch."""
    contract = Runner(bundle=demo_bundle, device="cpu", engine="torch").contract
    network = BaselineNet("densenet121", num_classes=len(contract.classes))
    from dataclasses import replace

    dense = replace(
        contract, architecture="densenet121", options={}, attention_stages=(), localization=None
    )
    caplog.set_level(logging.WARNING, logger="dp_model.serving.onnx_graph")
    assert write_onnx(tmp_path, network, dense) == ""
    assert not (tmp_path / "models" / "model.onnx").exists()
    assert "no ONNX graph written" in caplog.text and "grad_cam needs gradients" in caplog.text


def test_the_node_knows_the_engines_of_the_runner_and_refuses_another_in_one_line() -> None:
    assert NODE_ENGINES == ENGINES
    with pytest.raises(ValueError, match="engine") as caught:
        NodeConfig(engine="openvino")
    assert "\n" not in str(caught.value)


@pytest.mark.tools
def test_a_node_serves_a_bundle_with_a_graph_by_onnx_runtime_with_pytorchs_numbers(
    onnx_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = start_node(tmp_path, None, bundle=str(onnx_bundle), device="cpu", engine="auto")
    try:
        assert node.predictor.runner.engine == "onnx"
        assert "model engine: ONNX Runtime on the CPU" in caplog.text
        ds = chest_dataset()
        assert send(node.port, [ds]) == [0]
        folder = tmp_path / "out" / ds.StudyInstanceUID
        wait_for(lambda: folder.exists() and len(list(folder.glob("*.dcm"))) == 2, 30, "SR and SC")
    finally:
        node.stop()
    from pacs_node.model.predictor import NodePredictor, prepare

    eager = NodePredictor(onnx_bundle, "cpu", engine="torch")
    (want,) = eager.predict([prepare(ds, eager.contract.image_size)])
    (found,) = node.predictor.predict([prepare(ds, eager.contract.image_size)])
    np.testing.assert_allclose(found.probabilities, want.probabilities, rtol=0, atol=1e-4)


def test_a_graph_of_other_maps_than_the_contract_names_is_not_served(
    onnx_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The contract's map source changed after the graph was written (its digest still
    matches): auto serves in PyTorch, and the onnx engine is refused in one line."""
    from dp_model.networks.explain import map_sources
    from dp_model.serving.loading import load_bundle

    model, contract = load_bundle(onnx_bundle)
    assert contract.localization is not None
    other = next(s for s in map_sources(model) if s != contract.localization.source)
    folder = tmp_path / "other"
    folder.mkdir()
    for item in onnx_bundle.iterdir():
        if item.name != "configs":
            (folder / item.name).symlink_to(item.resolve())
    (folder / "configs").mkdir()
    meta = json.loads((onnx_bundle / "configs" / "metadata.json").read_text())
    meta["deep_pneumonia"]["localization"]["source"] = other
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    caplog.set_level(logging.INFO, logger="dp_model.serving.runner")
    assert Runner(bundle=folder, device="cpu", maps=True).engine == "torch"
    assert "its graph draws the maps of" in caplog.text
    # without maps asked for, the same graph serves
    assert Runner(bundle=folder, device="cpu").engine == "onnx"
    with pytest.raises(BundleError, match="onnx engine cannot serve: its graph draws the maps"):
        Runner(bundle=folder, device="cpu", maps=True, engine="onnx")


#: Run in a fresh interpreter: a node on the bundle ``argv[1]`` (work folder ``argv[2]``)
#: receives the phantom and RG1 (``argv[3]``) by C-STORE and writes their SR and SC; then it
#: prints which of PyTorch, torchvision and MONAI were ever imported, and what it predicts.
_NODE_SCRIPT = """
import json, sys
from pathlib import Path

from node_support import chest_dataset, send, start_node, wait_for
from pydicom import dcmread

bundle, work, rg1 = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
datasets = [chest_dataset(), dcmread(rg1)]
node = start_node(work, None, bundle=str(bundle), device="cpu", engine="auto")
try:
    statuses = send(node.port, datasets)
    for ds in datasets:
        folder = work / "out" / ds.StudyInstanceUID
        wait_for(lambda: folder.exists() and len(list(folder.glob("*.dcm"))) == 2, 60, "SR and SC")
finally:
    node.stop()
from pacs_node.model.predictor import prepare

size = node.predictor.contract.image_size
found = [node.predictor.predict([prepare(ds, size)])[0] for ds in datasets]
print(json.dumps({
    "engine": node.predictor.runner.engine,
    "statuses": statuses,
    "modules": sorted(m for m in ("torch", "torchvision", "monai") if m in sys.modules),
    "predictions": [
        {
            "probabilities": p.probabilities.tolist(),
            "decision": [p.assessed, p.positive, p.triage, p.label],
            "boxes": p.boxes.tolist(),
            "box_labels": list(p.box_labels),
            "ood_score": p.ood_score,
        }
        for p in found
    ],
}))
"""


def test_a_node_serving_a_graph_imports_no_pytorch_and_reports_what_pytorch_would(
    onnx_bundle: Path, tmp_path: Path, rg1_path: Path
) -> None:
    """The node in its own process, from start to the SR and SC of two images (the phantom
    and RG1), never imports PyTorch, torchvision or MONAI, and its probabilities, decisions,
    regions and gate scores are those of the same bundle in PyTorch."""
    import os
    import subprocess
    import sys

    from pydicom import dcmread

    from pacs_node.model.predictor import NodePredictor, prepare

    tests = Path(__file__).resolve().parent
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", _NODE_SCRIPT, str(onnx_bundle), str(tmp_path), str(rg1_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["engine"] == "onnx" and report["statuses"] == [0, 0]
    assert report["modules"] == []
    eager = NodePredictor(onnx_bundle, "cpu", engine="torch")
    size = eager.contract.image_size
    for found, ds in zip(report["predictions"], [chest_dataset(), dcmread(rg1_path)]):
        (want,) = eager.predict([prepare(ds, size)])
        np.testing.assert_allclose(found["probabilities"], want.probabilities, rtol=0, atol=1e-4)
        assert found["decision"] == [want.assessed, want.positive, want.triage, want.label]
        np.testing.assert_allclose(
            np.asarray(found["boxes"]).reshape(-1, 4), want.boxes, rtol=0, atol=1e-3
        )
        assert found["box_labels"] == list(want.box_labels)
        assert found["ood_score"] == pytest.approx(want.ood_score, rel=1e-4, abs=1e-4)


def test_a_bundle_whose_gate_is_stored_for_pytorch_alone_is_served_by_pytorch_and_says_why(
    demo_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A graph without ``models/ood.npz`` (bundles written before it was): auto serves in
    PyTorch with one INFO line why, the onnx engine is refused in one line, and the node's
    numbers are PyTorch's."""
    older = onnx_copy(demo_bundle, tmp_path / "older", arrays=False)
    caplog.set_level(logging.INFO, logger="dp_model.serving.runner")
    runner = Runner(bundle=older, device="cpu", maps=True)
    assert runner.engine == "torch"
    (line,) = [r.getMessage() for r in caplog.records if "model engine" in r.getMessage()]
    assert "PyTorch" in line and "NumPy statistics of the out-of-distribution gate" in line
    with pytest.raises(
        BundleError, match=r"^[^\n]*onnx engine cannot serve: the contract records no NumPy"
    ):
        Runner(bundle=older, device="cpu", engine="onnx")
    from pacs_node.model.predictor import NodePredictor, prepare

    node = NodePredictor(older, "cpu")
    (found,) = node.predict([prepare(chest_dataset(), node.contract.image_size)])
    assert node.runner.engine == "torch" and found.ood_score is not None


def test_altered_numpy_statistics_of_the_gate_are_refused_in_one_line(
    onnx_bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "altered"
    folder.mkdir()
    for item in onnx_bundle.iterdir():
        if item.name != "models":
            (folder / item.name).symlink_to(item.resolve())
    (folder / "models").mkdir()
    for item in (onnx_bundle / "models").iterdir():
        if item.name != "ood.npz":
            (folder / "models" / item.name).symlink_to(item.resolve())
    (folder / "models" / "ood.npz").write_bytes(
        (onnx_bundle / "models" / "ood.npz").read_bytes() + b"\0"
    )
    with pytest.raises(
        BundleError, match="ood.npz: the out-of-distribution gate's statistics cannot be used"
    ) as caught:
        Runner(bundle=folder, device="cpu", engine="auto")
    assert "\n" not in str(caught.value)


def test_the_runner_reads_from_the_graph_alone_which_maps_it_gives() -> None:
    """A graph gives the maps of the source it records, and CAM's are Grad-CAM's (a graph
    draws CAM only where CAM is exact); no network is asked."""
    from dp_model.serving.sources import drawn_as, draws

    assert draws("lesion:1", "lesion:1") and draws("cam", "grad_cam") and draws("cam", "cam")
    assert not draws("map+:3", "lesion:1") and not draws("cam", "map+:1")
    assert not draws(None, "grad_cam") and not draws("grad_cam", "grad_cam")
    assert (
        drawn_as("grad_cam", cam_exact=False) is None and drawn_as("lesion:2", False) == "lesion:2"
    )
