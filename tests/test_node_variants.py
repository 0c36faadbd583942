"""Model variants in the same framework: trained with dp-train's engine, served by the node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_engines_agree, onnx_copy, run_tool
from node_support import LOCALIZING, bundle_with, chest_dataset, identity_of, send, wait_for
from pydicom import dcmread

from dp_model.config import load_config
from dp_model.networks.explain import default_source, map_sources
from dp_model.serving.loading import load_bundle
from dp_model.serving.onnx_graph import graph_source, served_source
from dp_model.training.config import TrainConfig
from dp_model.training.run import train
from pacs_node import codes
from pacs_node.config import NodeConfig
from pacs_node.model.predictor import NodePredictor, prepare
from pacs_node.node import Node
from pacs_node.results.report import build_report

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


VARIANTS = {
    # config: (architecture, words of its description, heat-map source)
    "attention_resnet50": ("attention_resnet50", "1/sqrt(n)", "grad_cam"),
    "class_attention": ("class_attention", "n_min^2/n_i", "class_maps"),
    "cia_net": ("cia_net", "class-aware grid", "class_maps"),
}


def train_variant(name: str, data: Path, tmp_path: Path) -> Path:
    """One epoch of each stage on 90 phantoms (``dataset_dir``) at 32 px. Without the baselines (a plain
    ResNet18 and the block statistics, three fifths of the time): the model card's comparison
    is tested in test_training.py; here, what the variant's own config makes of the framework."""
    overrides = {
        "data.root": str(data),
        "data.image_size": 32,
        "data.cache_dir": str(tmp_path / "cache"),
        "data.workers": 1,
        "data.boxed_fraction": 0.5,
        "pretrain.epochs": 1,
        "pretrain.batch_size": 64,
        "finetune.epochs": 1,
        "finetune.batch_size": 32,
        "runtime.device": "cpu",
        "demo": True,
        "baseline": False,
    }
    config = load_config(TrainConfig, CONFIGS / f"{name}.yaml", overrides)
    bundle = tmp_path / name / "bundle"
    train(config, bundle)
    return bundle


@pytest.fixture(scope="module")
def trained(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``trained(name)``: the variant's bundle, trained once for the tests of this module."""
    root, bundles = tmp_path_factory.mktemp("variants"), {}

    def get(name: str) -> Path:
        if name not in bundles:
            bundles[name] = train_variant(name, dataset_dir, root)
        return bundles[name]

    return get


@pytest.mark.slow
@pytest.mark.tools
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_from_its_config_exports_a_bundle_and_the_node_serves_it(
    name: str, trained, tmp_path: Path
) -> None:
    architecture, description, heat = VARIANTS[name]
    bundle = trained(name)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert (
        meta["deep_pneumonia"]["architecture"] == architecture
        and description in meta["description"]
    )
    card = (bundle / "docs" / "README.md").read_text()
    assert architecture in card and "Localization accuracy" in card
    # The test image is no phantom the variant trained on: the gate off, so that its findings are reported.
    predictor = NodePredictor(bundle, "cpu", ood_gate=False)
    multi_label = predictor.contract.multi_label
    assert multi_label == (architecture != "attention_resnet50")
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(
        predictor.contract.output_classes
    )
    # The map source is the one chosen on validation, measured against the prior map.
    located = predictor.contract.localization
    assert (
        predictor.source == located.source
        and located.source in map_sources(predictor.model)
        and heat in located.candidates
    )
    assert "Lesion regions: measured against a fixed prior" in card
    # its log c_i, the others none
    assert bool(predictor.contract.logit_adjustment) == (architecture == "class_attention")
    if multi_label:
        assert (bundle / "docs" / "class_maps.png").exists()
    node = Node(
        NodeConfig(
            port=0,
            metrics_port=-1,
            spool=str(tmp_path / "spool"),
            output_dir=str(tmp_path / "out"),
            bundle=str(bundle),
            allow=("TESTSCU",),
        ),
        predictor,
    )
    node.start()
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [0]
        folder = tmp_path / "out" / ds.StudyInstanceUID
        wait_for(
            lambda: folder.exists() and len(list(folder.glob("*.dcm"))) == 2,
            120,
            "the variant's SR and SC",
        )
    finally:
        node.stop()
    (sr_path,) = folder.glob("SR.*.dcm")
    check = run_tool("dciodvfy", sr_path, check=False)
    assert not [
        line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
    ], check.stdout
    sr = dcmread(sr_path)
    assert sr.ManufacturerModelName == architecture  # the model that made it, named in the SR
    # The model's probability of pneumonia and of each finding, in the image-level group (a
    # region carries its own score, not a probability).
    (prediction,) = predictor.predict([prepare(ds, predictor.contract.image_size)])
    scores = probabilities(sr)
    assert len(scores) == 1 + 4
    expected = [prediction.pneumonia_probability] + [
        prediction.probability(c) for c in ("lobar", "bronchopneumonia", "interstitial", "cavitary")
    ]
    assert scores[:5] == pytest.approx([round(100 * p, 2) for p in expected], abs=0.011)


#: Variants whose forward pass no ONNX graph gives, and why (the exporter's refusal).
NO_GRAPH = {"cia_net": "affine_grid_generator"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_variants_bundle_serves_its_onnx_graph_with_the_numbers_of_pytorch(
    name: str, trained, tmp_path: Path
) -> None:
    """The graph dp-train wrote gives PyTorch's probabilities, maps and gate scores. Where none
    could be written (a network the exporter refuses, maps that need gradients) the bundle has
    none and runs in PyTorch; its weights then export with the network's own maps."""
    bundle = trained(name)
    model, contract = load_bundle(bundle)
    if name in NO_GRAPH or graph_source(model, served_source(model, contract)) is None:
        assert not (bundle / "models" / "model.onnx").exists()
        assert NodePredictor(bundle, "cpu").runner.engine == "torch"
        if name in NO_GRAPH or graph_source(model, default_source(model)) is None:
            return
        own = bundle_with(
            bundle, tmp_path / "own", localization=LOCALIZING | {"source": default_source(model)}
        )
        bundle = onnx_copy(own, tmp_path / "onnx")
    assert (bundle / "models" / "model.onnx").is_file()
    assert_engines_agree(bundle)


def probabilities(sr) -> list[float]:
    """Every probability an SR states ("Probability of ...", :func:`codes.probability_code`), in
    document order."""
    found = []

    def walk(items) -> None:
        for item in items:
            concept = item.ConceptNameCodeSequence[0] if item.ValueType == "NUM" else None
            if (
                concept
                and concept.CodingSchemeDesignator == codes.PRIVATE_SCHEME
                and concept.CodeValue.startswith("p-")
            ):
                found.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.mark.slow
@pytest.mark.xfail(
    reason="one epoch of alignment may warp the grid so that its detections cover less than the region-size check asks; to rework on an earned-contract bundle",
    strict=False,
)
def test_cia_net_detections_become_labelled_regions(trained, tmp_path: Path) -> None:
    # The variant test's own training (one module runs on one worker under --dist loadfile).
    # One epoch does not localize; how detections become regions is what is tested, so the
    # contract of a copy says the grid earned them.
    bundle = bundle_with(
        trained("cia_net"), tmp_path / "earned", localization=LOCALIZING | {"source": "class_maps"}
    )
    predictor = NodePredictor(bundle, "cpu", ood_gate=False)
    with torch.no_grad():  # make the grid certain of lobar everywhere, and of nothing else
        predictor.model.head[-1].bias.copy_(torch.tensor([8.0, -30.0, -30.0, -30.0]))
    ds = chest_dataset(rows=400, columns=300)
    (prediction,) = predictor.predict([prepare(ds, predictor.contract.image_size)])
    assert prediction.findings[0][0] == "lobar" and [label for label, _ in prediction.findings] == [
        "lobar"
    ]
    assert prediction.box_labels == ("lobar",)
    x0, y0, x1, y1 = prediction.boxes[0]
    # The whole of what the trained alignment looks at, in source pixels (the grid is warped
    # back from the aligned frame; where the aligned view does not reach there is no detection).
    assert (
        x0 >= 0
        and y0 >= 0
        and x1 <= 300
        and y1 <= 400
        and (x1 - x0) * (y1 - y0) >= 0.75 * 300 * 400
    )
    sr = build_report(ds, prediction, predictor.contract, identity_of(ds, predictor.contract))
    # the whole image's result, and the region
    assert str(sr.ContentSequence).count("POLYLINE") == 2
