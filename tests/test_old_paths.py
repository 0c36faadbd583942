"""The module paths of before the 2026-12-06 split still work, with a dated warning, until 0.2.0.

Bundles written before name them in their MONAI configs (``dp_model.architectures.build_network``,
``dp_model.inference.Predictor``) and users import them: each old module re-exports its new
home whole (:mod:`dp_model.deprecation`), and warns once per process, where it is imported.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Each module of the flat root that moved, old name -> new, both under dp_model.
MOVED = {
    **{
        m: f"networks.{m}"
        for m in [
            "architectures",
            "backbones",
            "classifier",
            "explain",
            "losses",
            "registry",
            "variants",
        ]
    },
    **{
        m: f"serving.{m}"
        for m in [
            "bundle",
            "calibration",
            "contract",
            "gate",
            "inference",
            "loading",
            "onnx_graph",
            "onnx_session",
            "ood",
            "runner",
            "served",
            "sources",
        ]
    },
    "train_cli": "training.cli",
}


def _fresh(old: str) -> None:
    """Forget the old module, so that importing it runs it (and warns) as in a new process."""
    sys.modules.pop(old, None)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_importing_an_old_module_warns_with_its_new_home_and_gives_the_same_objects(old) -> None:
    new = importlib.import_module(f"dp_model.{MOVED[old]}")
    _fresh(f"dp_model.{old}")
    with pytest.warns(
        DeprecationWarning,
        match=rf"dp_model\.{old} moved to dp_model\.{MOVED[old]} on 2026-12-06.*removed in 0\.2\.0",
    ):
        shim = importlib.import_module(f"dp_model.{old}")
    names = [n for n in vars(new) if not (n.startswith("__") and n.endswith("__"))]
    assert names and all(getattr(shim, n) is getattr(new, n) for n in names)
    assert getattr(shim, "__all__", None) == getattr(new, "__all__", None)


def test_the_networks_package_answers_the_old_networks_modules_names_and_its_own_modules() -> None:
    import dp_model.networks
    from dp_model.networks.networks import DeepPneumoniaNet, build_network

    with pytest.warns(DeprecationWarning, match="dp_model.networks.DeepPneumoniaNet moved"):
        assert dp_model.networks.DeepPneumoniaNet is DeepPneumoniaNet
    with pytest.warns(DeprecationWarning):
        from dp_model.networks import build_network as old
    assert old is build_network
    with pytest.raises(AttributeError):
        dp_model.networks.no_such_name  # noqa: B018


def test_the_registry_and_the_contract_bring_no_pytorch() -> None:
    # The networks package answers the old module's names only when asked: importing its light
    # registry (dp-train --help, config checks) or the contract (the node) imports no PyTorch.
    code = "import sys, dp_model.networks.registry, dp_model.serving.contract; print('torch' in sys.modules)"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert found.stdout.strip() == "False", found.stderr


#: The old names a bundle's configs used before 2026-12-06, and the new ones.
OLD_CONFIG_NAMES = {
    "dp_model.networks.architectures.": "dp_model.architectures.",
    "dp_model.serving.inference": "dp_model.inference",
}


def test_the_demo_bundle_written_with_the_old_paths_loads_and_predicts(
    demo_bundle: Path, tmp_path: Path
) -> None:
    """The demo bundle's own ``inference.json`` runs, through MONAI's parser, as a user runs it.
    /work/main/runs/demo/bundle (``DP_TEST_BUNDLE``) was written with the old paths; a bundle
    this code builds names the new ones, and is run here with them put back, so that the old
    names are what resolves either way."""
    from monai.bundle import ConfigParser

    from dp_model.serving.inference import Predictor
    from dp_model.serving.loading import load_bundle

    text = (demo_bundle / "configs" / "inference.json").read_text(encoding="utf-8")
    for new, old in OLD_CONFIG_NAMES.items():
        text = text.replace(new, old)
    config = json.loads(text)
    assert config["network_def"]["_target_"] == "dp_model.architectures.build_network"
    assert config["predictor"]["_target_"] == "dp_model.inference.Predictor"
    config |= {"bundle_root": str(demo_bundle), "output_dir": str(tmp_path), "device": "cpu"}
    for old in ("dp_model.architectures", "dp_model.inference"):
        _fresh(old)
    parser = ConfigParser(config)
    with pytest.warns(
        DeprecationWarning, match="dp_model.inference moved to dp_model.serving.inference"
    ):
        predictor = parser.get_parsed_content("predictor")
    assert type(predictor) is Predictor
    parser.get_parsed_content("run")  # the config's own run: predict_folder(samples, out)
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    samples = sorted(p.name for p in (demo_bundle / "samples").glob("*.dcm"))
    assert [Path(r.split(",")[0]).name for r in rows[1:]] == samples

    # The same weights through the normal loader give the same probabilities.
    model, contract = load_bundle(demo_bundle)
    assert contract.architecture == config["network_def"]["architecture"]
    paths = [demo_bundle / "samples" / name for name in samples]
    through_config, _ = predictor.probabilities(paths)
    through_loader, _ = Predictor(str(demo_bundle), network=model).probabilities(paths)
    assert np.isfinite(through_config).all()
    np.testing.assert_allclose(through_config, through_loader, atol=1e-5)


def test_python_m_the_old_command_line_still_runs_dp_train() -> None:
    found = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-m", "dp_model.train_cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert found.returncode == 0, found.stderr
    assert "usage: dp-train" in found.stdout
    assert "dp_model.train_cli moved to dp_model.training.cli on 2026-12-06" in found.stderr
