"""Localization as evidence: the pointing game, the prior map, every map source, the decision."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dp_model.metrics import localization_figures, paired_difference_low, pointing_game
from dp_model.networks.architectures import build_network
from dp_model.networks.classifier import ClassifierBase
from dp_model.networks.explain import CAM, GRAD_CAM, cam, grad_cam, map_sources, source_maps
from dp_model.training.config import ClassAttentionConfig, FinetuneConfig, MGACRConfig
from dp_model.training.data import Resident
from dp_model.training.objectives import logit_adjustment
from dp_model.training.regions import measure, prior_maps, prior_scores

SIZE = 32


def test_the_pointing_game_counts_a_tied_maximum_by_its_share_inside_the_box() -> None:
    truth = np.zeros((3, 4, 4), bool)
    truth[:, :2, :2] = True
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0, 0, 0] = 1.0  # inside
    maps[1, 3, 3] = 1.0  # outside
    maps[2] = 1.0  # flat: 4 of 16 pixels inside
    assert pointing_game(maps, truth).tolist() == [1.0, 0.0, 0.25]


def test_figures_average_within_each_class_then_over_classes() -> None:
    iou = np.array([0.9, 0.9, 0.9, 0.0])
    pointing = np.array([1.0, 1.0, 1.0, 0.0])
    labels = np.array([1, 1, 1, 2])
    figures = localization_figures(iou, pointing, labels)
    # not 0.75: the rare class counts as much
    assert figures == {"iou>0.1": 0.5, "iou>0.3": 0.5, "iou>0.5": 0.5, "pointing": 0.5}
    assert math.isnan(localization_figures(np.zeros(0), np.zeros(0), np.zeros(0))["pointing"])
    hits = np.ones(200)
    assert paired_difference_low(hits, np.zeros(200), np.ones(200)) == 1.0
    assert paired_difference_low(hits, hits, np.ones(200)) == 0.0


def boxed_split(n: int, seed: int, box=None) -> Resident:
    """``n`` images of class 1, each a bright box on black (at ``box``, or anywhere)."""
    rng = np.random.default_rng(seed)
    images, boxes = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8), torch.zeros(n, 1, 4)
    for i in range(n):
        x0, y0 = box or (int(rng.integers(0, SIZE - 10)), int(rng.integers(0, SIZE - 10)))
        boxes[i, 0] = torch.tensor([x0, y0, x0 + 10, y0 + 10], dtype=torch.float32)
        images[i, 0, y0 : y0 + 10, x0 : x0 + 10] = 255
    return Resident(
        images,
        boxes,
        torch.ones(n, dtype=torch.int64),
        torch.ones(n, dtype=torch.bool),
        [str(i) for i in range(n)],
    )


def test_the_prior_is_each_class_mean_training_box_at_half_its_peak() -> None:
    train = boxed_split(20, 0, box=(4, 6))
    prior = prior_maps(train, 3)
    # normal has no boxes
    assert prior.shape == (3, SIZE, SIZE) and prior[1].max() == 1.0 and not prior[0].any()
    assert prior_scores(prior, boxed_split(5, 1, box=(4, 6))).figures() == {
        "iou>0.1": 1.0,
        "iou>0.3": 1.0,
        "iou>0.5": 1.0,
        "pointing": 1.0,
    }
    far = prior_scores(prior, boxed_split(5, 1, box=(20, 20))).figures()
    assert far["iou>0.1"] == 0.0 and far["pointing"] == 0.0


class StandIn(ClassifierBase):
    """A network with one MGACR-like head whose ``map+`` is the image itself (it sees the
    lesion), or a fixed blob in a corner (it ignores the image)."""

    attention_stages = (3,)
    cam_layer = None  # learned maps only: no Grad-CAM to offer
    classifier_layer = None

    def __init__(self, sees: bool) -> None:
        super().__init__()
        self.sees, self.weight = sees, nn.Parameter(torch.zeros(1))

    def nearest_stage(self, preferred: int = 3) -> int:
        return 3

    def attention_map(self, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        if self.sees:
            return x
        corner = torch.zeros_like(x)
        corner[..., :6, :6] = 1.0
        return corner


def test_a_map_that_sees_the_lesion_earns_regions_and_one_that_ignores_the_image_does_not() -> None:
    train, val, test = boxed_split(60, 0), boxed_split(60, 1), boxed_split(60, 2)
    earned = measure(StandIn(True), train, val, test, 3, seed=0)
    assert (
        earned.source == "map+:3"
        and earned.shown
        and earned.validation["iou>0.5"] == 1.0
        and earned.test["pointing"] == 1.0
    )
    assert (
        earned.prior_validation["iou>0.3"] < 0.7
        and earned.difference_low > 0
        and earned.images == {"validation": 60, "test": 60}
    )
    blind = measure(StandIn(False), train, val, test, 3, seed=0)
    assert (
        not blind.shown and blind.validation["iou>0.3"] < blind.prior_validation["iou>0.3"] + 0.05
    )


def test_a_few_validation_images_cannot_earn_regions_however_good_the_map() -> None:
    located = measure(
        StandIn(True), boxed_split(60, 0), boxed_split(3, 1), boxed_split(3, 2), 3, seed=0
    )
    assert (
        located.validation["iou>0.3"] == 1.0 and located.difference_low <= 0 and not located.shown
    )


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50", "attention_resnet50"])
def test_cam_equals_grad_cam_where_it_is_exact(architecture: str) -> None:
    """With global average pooling and one linear layer, Grad-CAM's weights are the classifier's
    (divided by the map's area): the two maps agree once scaled to their peaks."""
    torch.manual_seed(0)
    net = build_network(architecture, 5, (3,) if architecture == "resnet18" else ()).eval()
    x, classes = torch.rand(2, 1, 64, 64), torch.tensor([1, 3])
    assert CAM in map_sources(net)
    torch.testing.assert_close(
        cam(net, x, classes), grad_cam(net, x, net.cam_layer, classes), atol=1e-4, rtol=1e-3
    )


def test_cam_is_offered_only_where_exact_and_every_source_gives_a_map_in_range() -> None:
    torch.manual_seed(0)
    assert map_sources(build_network("vgg16", 5)) == (GRAD_CAM,)
    attention = build_network("class_attention", 4).eval()
    assert map_sources(attention) == ("class_maps", GRAD_CAM)
    deep = build_network("resnet18", 5, (1, 2, 3, 4)).eval()
    assert map_sources(deep) == ("map+:1", "map+:2", "map+:3", "map+:4", GRAD_CAM, CAM)
    for net in (attention, deep):
        for source in map_sources(net):
            maps = source_maps(net, torch.rand(2, 1, 64, 64), source, torch.tensor([1, 2]))
            assert (
                maps.shape == (2, 1, 64, 64) and float(maps.min()) >= 0 and float(maps.max()) <= 1
            )
    with pytest.raises(ValueError, match="not offered"):
        source_maps(deep, torch.rand(1, 1, 64, 64), "class_maps", torch.tensor([1]))
    headed = build_network("resnet18", 5, (1, 2, 3, 4), lesion_stage=2).eval()
    assert map_sources(headed) == (
        "map+:1",
        "map+:2",
        "map+:3",
        "map+:4",
        "lesion:2",
        GRAD_CAM,
        CAM,
    )
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(
        source_maps(headed, x, "lesion:2", torch.tensor([1, 2])), headed.lesion_map(x)
    )


def test_a_configured_lesion_head_is_built_and_travels_in_the_network_options() -> None:
    from dp_model.training.objectives import build_classifier, network_options

    config = FinetuneConfig(mgacr=MGACRConfig(stages=(2, 3), lesion_stage=2))
    assert network_options(config, 64) == {"lesion_stage": 2}
    net = build_classifier(config, 5, None, seed=0, image_size=64)
    assert net.lesion_stage == 2 and "lesion:2" in map_sources(net)
    assert (
        build_network("resnet18", 5, (2, 3), **network_options(config, 64)).state_dict().keys()
        == net.state_dict().keys()
    )
    assert network_options(FinetuneConfig(), 64) == {}
    with pytest.raises(ValueError, match="lesion_stage"):
        MGACRConfig(stages=(2, 3), lesion_stage=1)


def test_class_attention_offsets_undo_its_positive_weights() -> None:
    """Trained with weight c on positives, the BCE optimum is p* = c q / (c q + 1 - q); the
    logit of p* is logit(q) + log c, so subtracting log c gives back q."""
    counts = [500, 40, 20, 10, 5]  # normal first, then the findings
    off = MGACRConfig(attention=False, feature_cr=False)
    config = FinetuneConfig(architecture="class_attention", mgacr=off)
    offsets = logit_adjustment(config, counts, 0)
    assert offsets == pytest.approx(
        [math.log(25 / 40), math.log(25 / 20), math.log(25 / 10), math.log(25 / 5)], abs=1e-6
    )
    c, q = 5.0, 0.1
    optimum = torch.logit(torch.tensor(c * q / (c * q + 1 - q)))
    assert float(torch.sigmoid(optimum - math.log(c))) == pytest.approx(q)
    assert (
        logit_adjustment(
            FinetuneConfig(
                architecture="class_attention",
                mgacr=off,
                class_attention=ClassAttentionConfig(logit_adjustment=False),
            ),
            counts,
            0,
        )
        == ()
    )
    assert logit_adjustment(FinetuneConfig(), counts, 0) == ()


def test_the_prior_and_the_maps_are_scored_on_the_same_images_in_the_same_order() -> None:
    """The paired interval pairs image i of the map with image i of the prior."""
    val = boxed_split(40, 5)
    located = measure(StandIn(True), boxed_split(40, 4), val, boxed_split(10, 6), 3, seed=1)
    prior = prior_scores(prior_maps(boxed_split(40, 4), 3), val)
    assert located.prior_validation == prior.figures()
    assert located.difference_low > 0


# --- counterfactual phantoms ---------------------------------------------------------------------


def test_a_case_renders_as_the_dataset_has_it_without_its_lesion_and_with_it_moved() -> None:
    from dp_model.synth import Difficulty, SynthConfig
    from dp_model.synth.counterfactual import render_variants
    from dp_model.synth.render import render_case

    config = SynthConfig(
        num_images=40,
        size=96,
        seed=7,
        version=1,
        difficulty=Difficulty(lesion_contrast=0.8, distractor_rate=1.0, pathology_overlap=0.5),
    )
    with pytest.raises(ValueError, match="version 1"):
        render_variants(replace(config, version=2), 0)
    seen = set()
    for index in range(16):
        variants, case = render_variants(config, index), render_case(config, index)
        assert np.array_equal(variants.with_lesion, case.pixels), (
            "the first variant is the dataset's image, to the bit"
        )
        seen.add(variants.label)
        if variants.label == "normal":
            assert (
                np.array_equal(variants.without_lesion, case.pixels)
                and np.array_equal(variants.moved, case.pixels)
                and not len(variants.boxes)
            )
            continue
        inside = np.zeros(case.pixels.shape, bool)
        for x0, y0, x1, y1 in variants.boxes.astype(int):
            inside[y0:y1, x0:x1] = True
        change = np.abs(variants.with_lesion - variants.without_lesion)
        assert change[inside].mean() > 5 * change[~inside].mean()  # only the lesion went
        centre = 96 / 2
        # Mirrored about the body's midline: each part's centre changes side.
        for (x0, _, x1, _), (m0, _, m1, _) in zip(variants.boxes, variants.moved_boxes):
            assert ((x0 + x1) / 2 - centre) * ((m0 + m1) / 2 - centre) < 0
    assert "normal" in seen and len(seen) >= 3


# --- benchmarks/localization_checks.py: its core on a tiny model -----------------------------------


def checks_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "localization_checks", Path(__file__).parents[1] / "benchmarks" / "localization_checks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cascading_randomization_changes_grad_cam_at_once_and_map_plus_only_once_its_head_goes():
    checks = checks_module()
    torch.manual_seed(0)
    net = build_network("resnet18", 5, (1, 2, 3, 4)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = boxed_split(6, 3)
    data = Resident(
        torch.nn.functional.interpolate(data.images.float(), size=64).to(torch.uint8),
        data.boxes * 2,
        data.labels,
        data.has_boxes,
        data.ids,
    )
    found = checks.model_randomization(net, data, normal=0, seed=0)
    assert list(found) == [
        "classifier (fc)",
        "attention heads",
        "layer4",
        "layer3",
        "layer2",
        "layer1",
        "stem (conv1, bn1)",
    ]
    # map+ is computed beside the classifier, not from it: the classifier's weights do not move it ...
    assert (
        found["classifier (fc)"]["map+:3"] == pytest.approx(1.0)
        and found["classifier (fc)"]["grad_cam"] < 0.95
    )
    # ... its own head does.
    assert found["attention heads"]["map+:3"] < 0.95 and found["stem (conv1, bn1)"]["cam"] < 0.95
    # the trained network is left as it was
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_shuffled_annotations_move_label_and_boxes_together() -> None:
    checks = checks_module()
    data = boxed_split(30, 0)
    data = Resident(data.images, data.boxes, torch.arange(30) % 5, data.has_boxes, data.ids)
    mixed = checks.shuffled(data, seed=1)
    assert sorted(mixed.labels.tolist()) == sorted(data.labels.tolist()) and not torch.equal(
        mixed.labels, data.labels
    )
    pairs = {(int(label), tuple(box[0].tolist())) for label, box in zip(data.labels, data.boxes)}
    assert {
        (int(label), tuple(box[0].tolist())) for label, box in zip(mixed.labels, mixed.boxes)
    } == pairs
    # the images stay: only who owns which annotation changes
    assert torch.equal(mixed.images, data.images)


class Oracle(ClassifierBase):
    """A stand-in that knows each counterfactual canvas: its map is the lesion where there is
    one (none without it), and it calls pneumonia by the same rule."""

    attention_stages = (3,)
    cam_layer = None  # learned maps only: no Grad-CAM to offer
    classifier_layer = None

    def __init__(self, cases: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        canvases = torch.from_numpy(cases["canvases"])
        masks = torch.from_numpy(cases["masks"]).float()
        self.known = [
            (canvases[i, v], masks[i, m] if m is not None else torch.zeros_like(masks[i, 0]))
            for i in range(len(canvases))
            for v, m in ((0, 0), (1, None), (2, 1))
        ]

    def nearest_stage(self, preferred: int = 3) -> int:
        return 3

    def _lesion(self, image: torch.Tensor) -> torch.Tensor:
        return next(mask for canvas, mask in self.known if torch.equal(canvas, image[0]))

    def attention_map(self, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        return torch.stack([self._lesion(image) for image in x])[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = torch.tensor([float(self._lesion(image).any()) for image in x])
        return torch.stack(
            [-4 * present + 2, 4 * present - 2, *([torch.full_like(present, -9.0)] * 3)], dim=1
        )


def test_counterfactual_rates_credit_a_map_that_follows_the_lesion(tmp_path) -> None:
    from dp_model.serving.contract import ModelContract
    from dp_model.synth import SynthConfig

    checks = checks_module()
    synth = SynthConfig(num_images=10, size=64, seed=7, version=1)
    cases = checks.counterfactual_cases(synth, 10, 6, 64, tmp_path)
    assert (
        cases["canvases"].shape == (6, 3, 64, 64)
        and cases["masks"].shape == (6, 2, 64, 64)
        and "normal" not in cases["labels"]
    )
    classes = ("normal", "lobar", "bronchopneumonia", "interstitial", "cavitary")
    contract = ModelContract(
        classes=classes,
        image_size=64,
        attention_stages=(3,),
        normal_class="normal",
        name="oracle",
        version="1",
        device_uid="2.25.1",
        demo=True,
        synthetic=True,
    )
    prior = np.zeros((5, 64, 64), np.float32)
    prior[:, :8, :8] = 1.0  # a corner: never where a lesion is
    rates = checks.counterfactual_rates(Oracle(cases), contract, cases, prior)
    assert (
        rates["positive_with"] == 1.0
        and rates["positive_without"] == 0.0
        and rates["flipped_to_negative"] == 1.0
    )
    oracle = rates["maps"]["map+:3"]
    assert (
        oracle["pointing_drawn"] == 1.0
        and oracle["mass_in_box_with"] == 1.0
        and oracle["mass_in_box_without"] == 0.0
    )
    if rates["moved_apart"]:
        assert oracle["follows"] == 1.0 and oracle["stays"] == 0.0
    assert rates["maps"]["prior"]["pointing_drawn"] == 0.0
