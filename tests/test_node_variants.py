"""Model variants in the same framework: trained with dp-train's engine, served by the node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_tool
from node_support import chest_dataset, send, wait_for
from pydicom import dcmread

from dp_model.config import load_config
from dp_model.training.config import TrainConfig
from dp_model.training.run import train
from pacs_node.config import NodeConfig
from pacs_node.node import Node
from pacs_node.predictor import NodePredictor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
@pytest.mark.tools
def test_attention_resnet50_trains_from_its_config_exports_a_bundle_and_the_node_serves_it(demo_bundle: Path, tmp_path: Path) -> None:
    overrides = {
        "data.root": str(demo_bundle.parent / "data"), "data.image_size": 64, "data.cache_dir": str(tmp_path / "cache"), "data.workers": 1,
        "finetune.epochs": 1, "finetune.batch_size": 32, "runtime.device": "cpu", "demo": True,
    }  # fmt: skip
    config = load_config(TrainConfig, CONFIGS / "attention_resnet50.yaml", overrides)
    bundle = tmp_path / "bundle"
    train(config, bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["deep_pneumonia"]["architecture"] == "attention_resnet50" and "1/sqrt(n)" in meta["description"]
    assert "attention_resnet50" in (bundle / "docs" / "README.md").read_text()
    predictor = NodePredictor(bundle, "cpu")
    assert predictor.stage is None  # no MGACR heads: the heat map is Grad-CAM
    node = Node(NodeConfig(port=0, metrics_port=-1, spool=str(tmp_path / "spool"), output_dir=str(tmp_path / "out"), bundle=str(bundle)), predictor)
    node.start()
    try:
        ds = chest_dataset()
        assert send(node.port, [ds]) == [0]
        folder = tmp_path / "out" / ds.StudyInstanceUID
        wait_for(lambda: folder.exists() and len(list(folder.glob("*.dcm"))) == 2, 120, "the variant's SR and SC")
    finally:
        node.stop()
    (sr_path,) = folder.glob("SR.*.dcm")
    check = run_tool("dciodvfy", sr_path, check=False)
    assert not [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")], check.stdout
    sr = dcmread(sr_path)
    assert sr.ManufacturerModelName == "attention_resnet50"  # the model that made it, named in the SR
