"""The out-of-distribution detectors (dp_model/serving/ood.py): each score against an answer known in
advance on small synthetic features, what a forward pass shows them, their files, and the
node's default gate on a far-OOD image and a held-out phantom."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

from dp_model.serving.contract import ContractError, OODGate
from dp_model.serving.gate import load_arrays
from dp_model.serving.ood import (
    DEFAULT_DETECTOR,
    DETECTORS,
    Energy,
    FeatureStatistics,
    MaxSoftmax,
    MultiLayerMahalanobis,
    NearestNeighbour,
    RelativeMahalanobis,
    Seen,
    VirtualLogit,
    estimated_shrinkage,
    fit_detector,
    load_detector,
    observe,
    stage_modules,
    watching,
    write_statistics,
)


def seen(
    features: np.ndarray | torch.Tensor,
    logits: np.ndarray | torch.Tensor | None = None,
    stages: tuple = (),
) -> Seen:
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    logits = (
        torch.zeros(len(features), 3)
        if logits is None
        else torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    )
    return Seen(
        logits, features, tuple(torch.as_tensor(np.asarray(s), dtype=torch.float32) for s in stages)
    )


def two_classes(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes at (-3, 0) and (3, 0), shared covariance diag(1, 4)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    features = rng.normal(size=(n, 2)) * np.array([1.0, 2.0]) + np.where(
        labels[:, None] == 0, -3.0, 3.0
    ) * np.array([1.0, 0.0])
    return features, labels


# --- scores with known answers ---------------------------------------------------------------


def test_msp_is_minus_the_largest_softmax_probability() -> None:
    logits = np.array([[0.0, 0.0, 0.0], [np.log(8.0), 0.0, 0.0], [0.0, 50.0, 0.0]])
    scores = MaxSoftmax().score(seen(np.zeros((3, 2)), logits))
    np.testing.assert_allclose(scores, [-1 / 3, -0.8, -1.0], atol=1e-6)


def test_energy_is_minus_the_log_sum_exp_of_the_logits() -> None:
    logits = np.log(np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]))
    scores = Energy().score(seen(np.zeros((2, 2)), logits))
    np.testing.assert_allclose(scores, [-math.log(6.0), -math.log(3.0)], atol=1e-6)


def test_mahalanobis_is_the_squared_distance_to_the_nearest_class_mean_in_the_shared_covariance():
    features, labels = two_classes()
    stats = FeatureStatistics.fit(torch.from_numpy(features), labels, shrinkage=0.0)
    # Two standard deviations from class 1's mean along either axis: 2^2 = 4; at a class mean: 0.
    scores = stats.score(seen([[5.0, 0.0], [3.0, 4.0], [-3.0, 0.0]]))
    np.testing.assert_allclose(scores, [4.0, 4.0, 0.0], atol=0.25)


@pytest.mark.parametrize("method", ["ledoit-wolf", "oas"])
def test_the_shrinkage_is_sklearns_estimate_and_shrinks_little_with_many_images_and_much_with_few(
    method: str,
) -> None:
    from sklearn.covariance import OAS, LedoitWolf

    rng = np.random.default_rng(1)
    # Unequal variances: the scaled identity is not the truth, and many images show it.
    many, few = (
        rng.normal(size=(5000, 8)) * np.linspace(0.5, 3, 8),
        rng.normal(size=(10, 50)) * np.linspace(0.5, 2, 50),
    )
    reference = (LedoitWolf if method == "ledoit-wolf" else OAS)(assume_centered=True)
    for x in (many, few):
        assert estimated_shrinkage(torch.from_numpy(x), method) == pytest.approx(
            reference.fit(x).shrinkage_, rel=1e-6
        )
    assert (
        estimated_shrinkage(torch.from_numpy(many), method)
        < 0.05
        < 0.3
        < estimated_shrinkage(torch.from_numpy(few), method)
    )


def test_relative_mahalanobis_is_zero_everywhere_for_one_class_and_discounts_shared_variation():
    features, labels = two_classes()
    one = RelativeMahalanobis.fit(torch.from_numpy(features), np.zeros(len(features), int))
    # One class: its Gaussian is the background's, so the difference vanishes wherever the point is.
    np.testing.assert_allclose(
        one.score(seen([[0.0, 0.0], [10.0, -7.0], [-3.0, 2.0]])), 0.0, atol=1e-3
    )
    two = RelativeMahalanobis.fit(torch.from_numpy(features), labels)
    plain = FeatureStatistics.fit(torch.from_numpy(features), labels)
    # Far along y (where both classes vary alike), the relative score is far below the plain one.
    far = seen([[3.0, 12.0]])
    assert plain.score(far)[0] > 30 and two.score(far)[0] < 0.5 * plain.score(far)[0]


def test_relative_mahalanobis_ranks_a_direction_the_training_images_do_not_span_as_outside():
    rng = np.random.default_rng(5)
    labels = np.arange(300) % 3
    features = np.zeros((300, 100))
    # three well-separated classes
    features[:, :3] = rng.normal(size=(300, 3)) + np.eye(3)[labels] * 6.0
    features[:, 3:] = rng.normal(size=(300, 97)) * 0.3  # less variation elsewhere
    detector = RelativeMahalanobis.fit(torch.from_numpy(features), labels)
    away = features[:1].copy()
    away[0, 10] += 5.0  # 17 standard deviations along a direction the training images hardly take
    # (The background's shrinkage estimated apart, 0.01 against the classes' 0.16, scores it -70.)
    assert detector.score(seen(away))[0] > detector.score(seen(features)).max()


def test_knn_is_the_distance_of_normalised_features_to_the_kth_nearest_training_image() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * torch.tensor(
        [[1.0], [2.0], [3.0], [4.0]]
    )
    first, second = NearestNeighbour.fit(bank, 1), NearestNeighbour.fit(bank, 2)
    query = seen([[5.0, 0.0], [1.0, 1.0]])  # on a training direction; halfway between two
    np.testing.assert_allclose(first.score(query), [0.0, math.sqrt(2 - math.sqrt(2))], atol=1e-5)
    np.testing.assert_allclose(
        second.score(query), [math.sqrt(2), math.sqrt(2 - math.sqrt(2))], atol=1e-5
    )
    with pytest.raises(ValueError, match="k must lie"):
        NearestNeighbour.fit(bank, 5)


def test_vim_adds_alpha_times_the_norm_outside_the_principal_subspace_to_minus_the_energy() -> None:
    rng = np.random.default_rng(2)
    features = np.zeros((2000, 4))
    # the training features live in the first two axes
    features[:, :2] = rng.normal(size=(2000, 2)) * 3.0
    features[:, 2:] = rng.normal(size=(2000, 2)) * 0.01
    classifier = torch.nn.Linear(4, 3)
    with torch.no_grad():
        classifier.weight.copy_(
            torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
        )
        classifier.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    x = torch.from_numpy(features).float()
    vim = VirtualLogit.fit(x, classifier(x).detach(), classifier, dim=2)
    # The origin is where the classifier's logits vanish (in its row space).
    assert torch.allclose(classifier(vim.origin[None]), torch.zeros(1, 3), atol=1e-5)
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    inside, off = vim.score(seen([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 5.0, 0.0]], logits))
    assert off - inside == pytest.approx(vim.alpha * 5.0, rel=0.01)
    assert inside == pytest.approx(
        -torch.logsumexp(logits[0], 0).item(), abs=0.05 * vim.alpha + 1e-3
    )


def test_vim_keeps_a_residual_when_the_training_images_are_fewer_than_the_dimensions() -> None:
    rng = np.random.default_rng(4)
    features = torch.from_numpy(rng.normal(size=(40, 64))).float()
    classifier = torch.nn.Linear(64, 3)
    vim = VirtualLogit.fit(features, classifier(features).detach(), classifier)
    # 40 images span 40 dimensions: a 32-dimensional principal space (half the 64) would leave
    # them no residual at all; at most half the images (20) leaves them one.
    assert vim.residual.shape == (64, 44) and 0 < vim.alpha < 1e3


def test_multilayer_mahalanobis_standardises_each_stage_by_the_training_scores_and_averages():
    features, labels = two_classes(2000)
    x = torch.from_numpy(features).float()
    one = MultiLayerMahalanobis.fit((x,), labels)
    own = one.score(seen(features, stages=(features,)))
    assert own.mean() == pytest.approx(0.0, abs=1e-4) and own.std(ddof=1) == pytest.approx(
        1.0, rel=1e-3
    )
    twice = MultiLayerMahalanobis.fit((x, x), labels)
    query = np.array([[5.0, 0.0], [0.0, 9.0]])
    np.testing.assert_allclose(
        twice.score(seen(query, stages=(query, query))),
        one.score(seen(query, stages=(query,))),
        rtol=1e-5,
    )
    # Far in one stage only: half of the standardised distance.
    home = np.array([[3.0, 0.0], [3.0, 0.0]])
    mixed = twice.score(seen(query, stages=(query, home)))
    np.testing.assert_allclose(
        mixed,
        0.5 * (one.score(seen(query, stages=(query,))) + one.score(seen(home, stages=(home,)))),
        rtol=1e-5,
    )


# --- what a forward pass shows, files, contract -----------------------------------------------


def test_a_watched_forward_pass_shows_logits_penultimate_features_and_the_four_pooled_stages():
    from dp_model.networks.networks import DeepPneumoniaNet

    torch.manual_seed(0)
    model = DeepPneumoniaNet(attention_stages=(2, 3)).eval()
    x = torch.rand(3, 1, 32, 32)
    found = observe(model, [x[:2], x[2:]], stages=True)
    assert [s.shape[1] for s in found.stages] == [64, 128, 256, 512] and len(found) == 3
    # The penultimate representation of a ResNet is its last stage, average-pooled; the logits its linear map.
    assert torch.allclose(found.features, found.stages[-1], atol=1e-5)
    assert torch.allclose(found.logits, model(x), atol=1e-5) and torch.allclose(
        model.classifier_layer(found.features), found.logits, atol=1e-5
    )
    with torch.no_grad(), watching(model, stages=True) as watch:
        # the node's path: forward_train, attention heads and all
        logits, _ = model.forward_train(x)
        assert torch.allclose(watch.seen(logits, 3).stages[0], found.stages[0], atol=1e-5)
        model(x), model(x)
        with pytest.raises(ValueError, match="2 feature passes"):
            watch.seen(logits, 3)


def test_a_network_without_residual_stages_has_no_multilayer_view() -> None:
    class Plain(torch.nn.Module):  # a VGG's shape: features, then a classifier
        def __init__(self) -> None:
            super().__init__()
            self.features, self.head = (
                torch.nn.Sequential(
                    torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
                ),
                torch.nn.Linear(4, 3),
            )
            self.layer1 = torch.nn.Identity()  # one stage of the name is not four

        classifier_layer = property(lambda self: self.head)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    assert stage_modules(Plain()) is None
    assert observe(Plain(), [torch.rand(2, 1, 8, 8)]).features.shape == (2, 4)
    with pytest.raises(ValueError, match="no residual stages"), watching(Plain(), stages=True):
        pass


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_every_detector_saves_and_loads_to_the_same_scores_and_refuses_another_networks_size(
    kind: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(300) % 3
    features = torch.from_numpy(rng.normal(size=(300, 16)) + labels[:, None]).float()
    classifier = torch.nn.Linear(16, 3)
    train = Seen(classifier(features).detach(), features, (features[:, :8], features))
    detector = fit_detector(kind, train, labels, classifier)
    assert detector.kind == kind and kind in DETECTORS
    detector.save(tmp_path / "ood.pt")
    loaded = load_detector(tmp_path / "ood.pt", kind, 16)
    np.testing.assert_allclose(loaded.score(train), detector.score(train), rtol=1e-5, atol=1e-5)
    if kind not in ("msp", "energy", "multilayer_mahalanobis"):
        # these hold nothing of the penultimate size
        with pytest.raises(ValueError):
            load_detector(tmp_path / "ood.pt", kind, 32)


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_every_detectors_numpy_statistics_score_as_pytorchs_without_it(
    kind: str, tmp_path: Path
) -> None:
    """``models/ood.npz`` (what the node serving an ONNX graph reads) gives the scores of
    ``models/ood.pt``; one altered byte, or another network's size, is refused."""
    rng = np.random.default_rng(4)
    labels = np.arange(300) % 3
    features = torch.from_numpy(rng.normal(size=(300, 16)) + labels[:, None]).float()
    classifier = torch.nn.Linear(16, 3)
    train = Seen(classifier(features).detach(), features, (features[:, :8], features))
    detector = fit_detector(kind, train, labels, classifier)
    _, digest = write_statistics(detector, tmp_path)
    arrays = load_arrays(tmp_path / "ood.npz", kind, digest, 16)
    numpy_seen = [x.numpy() for x in (train.logits, train.features)]
    np.testing.assert_allclose(
        arrays.score(*numpy_seen, tuple(s.numpy() for s in train.stages)),
        detector.score(train),
        rtol=1e-6,
        atol=1e-6,
    )
    (tmp_path / "ood.npz").write_bytes((tmp_path / "ood.npz").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_arrays(tmp_path / "ood.npz", kind, digest, 16)
    if kind not in ("msp", "energy", "multilayer_mahalanobis"):
        _, digest = write_statistics(detector, tmp_path)
        with pytest.raises(ValueError):
            load_arrays(tmp_path / "ood.npz", kind, digest, 32)


def test_statistics_of_one_detector_are_refused_as_another() -> None:
    with pytest.raises(ValueError, match="not known"):
        fit_detector("odin", Seen(torch.zeros(2, 2), torch.zeros(2, 2)), np.zeros(2))


def test_the_contract_names_every_detector_and_refuses_unknown_ones_and_impossible_thresholds():
    base = {"threshold": 5.0, "quantile": 0.99, "held_out": 300}
    assert OODGate.from_json(base).kind == "mahalanobis"  # bundles written before name none
    for kind in DETECTORS:
        assert OODGate.from_json(base | {"kind": kind}).kind == kind
    # minus a log-sum-exp
    assert OODGate.from_json(base | {"kind": "energy", "threshold": -4.2}).threshold == -4.2
    for bad in (
        {"kind": "odin"},
        {"kind": "mahalanobis", "threshold": -1.0},
        {"kind": "msp", "threshold": float("nan")},
    ):
        with pytest.raises(ContractError):
            OODGate.from_json(base | bad)


# --- the node's default gate -------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_gate_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle gated by the default detector: as trained, or given it (fitted on its
    own training split, thresholded on its calibration split) when it was trained before."""
    from dp_model.serving.bundle import load_bundle

    _, contract = load_bundle(demo_bundle)
    if contract.ood is not None and contract.ood.kind == DEFAULT_DETECTOR:
        return demo_bundle
    data = demo_bundle.parent / "data"
    if not (data / "labels.csv").exists():
        pytest.skip(f"the demo bundle's data ({data}) is needed to give it the default gate")
    copy = tmp_path_factory.mktemp("default_gate") / "bundle"
    shutil.copytree(demo_bundle, copy, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    from dp_model.training.calibrate import fit_gate, replace_gate, resident_splits

    model, _ = load_bundle(copy)
    splits = resident_splits(copy, data, ("train", "calibration", "val"))
    held_out = "calibration" if len(splits.get("calibration", ())) >= 10 else "val"
    gate, detector = fit_gate(model, splits["train"], splits[held_out], held_out, DEFAULT_DETECTOR)
    replace_gate(copy, gate, detector)
    assert (
        json.loads((copy / "configs" / "metadata.json").read_text())["deep_pneumonia"]["ood"][
            "kind"
        ]
        == DEFAULT_DETECTOR
    )
    return copy


# --- near-OOD phantoms -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shift", ["lateral", "paediatric", "lut", "edge", "rotated", "cropped", "inverted", "ct_scout"]
)
def test_each_shift_renders_the_same_image_twice_unlike_the_generators_own(shift: str) -> None:
    from dp_model.synth import SynthConfig
    from dp_model.synth.render import render_case
    from dp_model.synth.shifts import SHIFTS, render_shifted

    assert shift in SHIFTS
    config = SynthConfig(size=160, num_images=4, seed=3)
    own = render_case(config, 1).pixels
    image = render_shifted(config, 1, shift)
    assert np.array_equal(image, render_shifted(config, 1, shift)) and not np.array_equal(
        image, render_shifted(config, 2, shift)
    )
    assert (
        image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1 and image.std() > 0.05
    )
    assert image.shape != own.shape or np.abs(image - own).mean() > 0.02
    # the generator's own image is untouched
    assert np.array_equal(own, render_case(config, 1).pixels)
    if shift == "ct_scout":
        assert image.shape[0] > 2 * image.shape[1]
    if shift == "inverted":
        from dataclasses import replace

        from dp_model.synth.shifts import _seed

        np.testing.assert_allclose(
            image, 1 - render_case(replace(config, seed=_seed(config, shift)), 1).pixels
        )


def ct_slice_as_chest_radiograph() -> Dataset:
    """A CT slice (pydicom-data's 693_UNCR.dcm, as displayed) under a CR chest PA header:
    a far-OOD image whose header the node's screening cannot tell from a radiograph's."""
    from helpers import data_file
    from node_support import chest_dataset
    from pydicom import dcmread

    from dp_transforms import dicom_to_image

    pixels = dicom_to_image(dcmread(data_file("693_UNCR.dcm"))).pixels
    ds = chest_dataset(rows=pixels.shape[0], columns=pixels.shape[1])
    ds.PixelData = np.rint(np.clip(pixels, 0, 1) * 4095).astype(np.uint16).tobytes()
    return ds


def test_the_default_gate_marks_a_far_ood_image_not_assessed_and_a_held_out_phantom_assessed(
    default_gate_bundle: Path, tmp_path: Path
) -> None:
    from node_support import final_lines, send, start_node, wait_for
    from pydicom import dcmread

    from pacs_node.model.predictor import NodePredictor
    from pacs_node.status import StoreStatus

    predictor = NodePredictor(default_gate_bundle, "cpu")
    assert predictor.contract.ood is not None and predictor.contract.ood.kind == DEFAULT_DETECTOR
    far, phantom = (
        ct_slice_as_chest_radiograph(),
        dcmread(sorted((default_gate_bundle / "samples").glob("*.dcm"))[0]),
    )
    node = start_node(tmp_path, predictor)
    try:
        assert send(node.port, [far, phantom]) == [StoreStatus.SUCCESS] * 2
        lines = wait_for(
            lambda: len(final_lines(node)) == 2 and final_lines(node), 60, "both outcomes"
        )
    finally:
        node.stop()
    outcome = {line["sop_instance_uid"]: line for line in lines}
    far_line, phantom_line = outcome[str(far.SOPInstanceUID)], outcome[str(phantom.SOPInstanceUID)]
    assert far_line["status"] == phantom_line["status"] == "processed"
    assert (
        far_line["result"]["assessed"] is False
        and far_line["result"]["not_assessed"] == "out-of-distribution"
    )
    assert far_line["result"]["ood_score"] > predictor.contract.ood.threshold
    assert (
        phantom_line["result"]["assessed"] is True
        and phantom_line["result"]["ood_score"] <= predictor.contract.ood.threshold
    )
