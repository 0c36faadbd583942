"""The multi-label variants: class-based attention (seed 003) and CIA-Net (seed 002).

Each loss against a direct re-computation of its paper's equation on small tensors, and
each network's parts against what the paper says they compute.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dp_model.metrics import localization_accuracy, mask_iou
from dp_model.networks.architectures import build_network, class_scores
from dp_model.networks.losses import (
    cia_loss,
    class_attention_loss,
    class_attention_weights,
    consistency_loss,
    feature_reconstruction_loss,
)
from dp_model.networks.variants import (
    AlignmentModule,
    AttentionGate,
    CIANet,
    ClassAttentionNet,
    mil_logits,
    unwarp,
    warp,
)
from dp_model.training.data import Resident, keep_boxes
from dp_model.training.objectives import grid_targets

torch.manual_seed(0)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --- class-based attention: Eq. 5 ----------------------------------------------------------------


def test_positive_weights_are_n_min_squared_over_n_i() -> None:
    assert class_attention_weights([50, 10, 200, 0]).tolist() == pytest.approx(
        [1 / 50, 1 / 10, 1 / 200, 1.0]
    )
    assert class_attention_weights([40, 10, 20]).tolist() == pytest.approx(
        [100 / 40, 100 / 10, 100 / 20]
    )


@pytest.mark.parametrize("entropy_weight", [0.0, 0.1, 2.0])
def test_class_attention_loss_matches_equation_5(entropy_weight: float) -> None:
    b, k = 4, 3
    logits = torch.randn(b, k)
    attention = torch.rand(b, k, 3, 5).flatten(2).softmax(dim=-1).view(b, k, 3, 5)
    target = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.float32)
    weights = class_attention_weights([30, 12, 5])
    total = 0.0
    for t in range(b):
        for i in range(k):
            p = sigmoid(float(logits[t, i]))
            w = attention[t, i].flatten().double()
            entropy = float(-(w * w.log()).sum())
            y = float(target[t, i])
            total += -(
                float(weights[i]) * y * math.log(p)
                + (1 - y) * (math.log(1 - p) + entropy_weight * entropy)
            )
    expected = total / b  # summed over classes, averaged over images
    assert float(
        class_attention_loss(logits, attention, target, weights, entropy_weight)
    ) == pytest.approx(expected, rel=1e-5)


def test_the_entropy_term_flattens_the_maps_of_absent_classes_only() -> None:
    logits, target = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    peaked = torch.zeros(1, 2, 4, 4)
    peaked[..., 0, 0] = 1.0
    flat = torch.full((1, 2, 4, 4), 1 / 16)
    weights = torch.ones(2)
    # Flattening the absent class's map lowers the loss by lambda * log(16); the present class's map does not count.
    absent_flat = torch.stack([peaked[0, 0], flat[0, 1]])[None]
    present_flat = torch.stack([flat[0, 0], peaked[0, 1]])[None]
    drop = class_attention_loss(logits, peaked, target, weights, 0.5) - class_attention_loss(
        logits, absent_flat, target, weights, 0.5
    )
    assert float(drop) == pytest.approx(0.5 * math.log(16), rel=1e-5)
    assert float(class_attention_loss(logits, present_flat, target, weights, 0.5)) == pytest.approx(
        float(class_attention_loss(logits, peaked, target, weights, 0.5))
    )


def test_an_attention_gate_computes_equations_1_to_3() -> None:
    gate = AttentionGate(channels=6, global_channels=5, dim=4, heads=3)
    local, g = torch.randn(2, 6, 3, 4), torch.randn(2, 5)
    features, weights = gate(local, g)
    assert features.shape == (2, 3, 6) and weights.shape == (2, 3, 3, 4)
    for head in range(3):
        a = gate.score.weight[head, :, 0, 0]  # A_sj
        b = gate.local.weight[head * 4 : (head + 1) * 4, :, 0, 0]  # B_sj
        # A . B . l_i
        scores = torch.einsum("d,dchw->hw", a, (b[:, :, None, None] * local[0][None]))
        scores = (
            scores
            + a
            @ (
                gate.local.bias[head * 4 : (head + 1) * 4]
                + gate.project.weight[head * 4 : (head + 1) * 4] @ g[0]
            )
            + gate.score.bias[head]
        )
        w = scores.flatten().softmax(dim=0)  # Eq. 2
        assert torch.allclose(weights[0, head].flatten(), w, atol=1e-5)
        assert torch.allclose(features[0, head], local[0].flatten(1) @ w, atol=1e-5)  # Eq. 3


def test_class_gates_have_independent_parameters() -> None:
    net = ClassAttentionNet(num_classes=3, dim=8).eval()
    x = torch.rand(2, 1, 64, 64)
    before, maps_before = net(x, train_outputs=True)
    with torch.no_grad():
        net.gates[2].score.weight[1].add_(1.0)  # A_3j of class 1 only
    after, maps_after = net(x, train_outputs=True)
    assert torch.allclose(maps_before[:, [0, 2]], maps_after[:, [0, 2]]) and not torch.allclose(
        maps_before[:, 1], maps_after[:, 1]
    )
    assert torch.allclose(before[:, [0, 2]], after[:, [0, 2]]) and not torch.allclose(
        before[:, 1], after[:, 1]
    )


# --- CIA-Net: Eq. 2-6 ----------------------------------------------------------------------------


def test_mil_logits_are_the_logit_of_one_minus_the_product() -> None:
    grid = torch.randn(3, 2, 4, 4) * 3
    p = torch.sigmoid(grid.double()).flatten(2)
    expected = 1 - torch.prod(1 - p, dim=-1)
    assert torch.allclose(torch.sigmoid(mil_logits(grid)).double(), expected, atol=1e-6)
    assert (
        torch.isfinite(mil_logits(torch.full((1, 1, 2, 2), -40.0))).all()
        and torch.isfinite(mil_logits(torch.full((1, 1, 2, 2), 40.0))).all()
    )


@pytest.mark.parametrize("box_weight", [1.0, 0.5])
def test_cia_loss_matches_equations_4_to_6(box_weight: float) -> None:
    b, k, h, w = 3, 2, 2, 3
    grid = torch.randn(b, k, h, w)
    grid_target = (torch.rand(b, k, h, w) > 0.6).float()
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    boxed = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    total = 0.0
    for i in range(b):
        for c in range(k):
            p = [sigmoid(float(z)) for z in grid[i, c].flatten()]
            y = grid_target[i, c].flatten().tolist()
            # Eq. 4
            box_level = sum(
                -yj * math.log(pj) - (1 - yj) * math.log(1 - pj) for yj, pj in zip(y, p)
            )
            product = math.prod(1 - pj for pj in p)
            # Eq. 5
            image_level = -float(target[i, c]) * math.log(1 - product) - (
                1 - float(target[i, c])
            ) * math.log(product)
            lam = float(boxed[i, c])
            total += lam * box_weight * box_level + (1 - lam) * image_level  # Eq. 6
    assert float(cia_loss(grid, grid_target, boxed, target, box_weight)) == pytest.approx(
        total / b, rel=1e-5
    )


def test_alignment_losses_match_equation_2_and_pixel_distance() -> None:
    a, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    expected = np.mean([float((a[i] - t[i]).flatten().norm()) / 60 for i in range(2)])
    assert float(feature_reconstruction_loss(a, t)) == pytest.approx(expected, rel=1e-5)
    assert float(consistency_loss(a[:, :1], t[:, :1])) == pytest.approx(
        float((a[:, :1] - t[:, :1]).abs().mean())
    )


def test_the_alignment_transform_is_equation_1_and_starts_as_the_identity() -> None:
    module = AlignmentModule().eval()
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(module(x), x, atol=1e-5)
    with torch.no_grad():
        module.parameters_out.bias.copy_(torch.tensor([0.2, -0.4, 0.3, -0.1, 0.5]))
    matrix = module.transform(x)[0]
    raw = torch.tanh(torch.tensor([0.2, -0.4, 0.3, -0.1, 0.5]))
    tx, ty, sx, sy, theta = (
        0.5 * raw[0],
        0.5 * raw[1],
        math.exp(0.25 * raw[2]),
        math.exp(0.25 * raw[3]),
        math.pi / 12 * raw[4],
    )
    expected = torch.tensor(
        [
            [sx * math.cos(theta), -sy * math.sin(theta), tx],
            [sx * math.sin(theta), sy * math.cos(theta), ty],
        ]
    )
    assert torch.allclose(matrix, expected, atol=1e-5)


SHIFT = 0.25  # the alignment of the frame tests: a pure translation by an eighth of the image


def _shifted_alignment(net: CIANet) -> None:
    """Make ``net``'s alignment a translation: aligned(u) = input(u + SHIFT) in normalised x."""
    with torch.no_grad():
        net.align.parameters_out.bias.copy_(
            torch.tensor([math.atanh(2 * SHIFT), 0.0, 0.0, 0.0, 0.0])
        )


def _square(size: int = 64, box: tuple[int, int, int, int] = (8, 24, 24, 40)) -> torch.Tensor:
    x0, y0, x1, y1 = box
    image = torch.zeros(1, 1, size, size)
    image[..., y0:y1, x0:x1] = 1.0
    return image


def test_warp_and_unwarp_are_inverse_at_any_resolution() -> None:
    theta = torch.tensor([[[1.1, -0.1, 0.2], [0.05, 0.9, -0.1]]])
    mask = _square()
    moved = warp(mask, theta) >= 0.5
    back = unwarp(warp(mask, theta), theta) >= 0.5
    truth = mask >= 0.5
    assert (moved & truth).sum() / (moved | truth).sum() < 0.6  # it did move
    # and came back (bilinear twice blurs the edges)
    assert (back & truth).sum() / (back | truth).sum() > 0.85
    # The same theta moves a 16 x 16 grid as it moves the 64 x 64 image.
    small = F.adaptive_avg_pool2d(warp(mask, theta), 16)
    assert torch.allclose(small, warp(F.adaptive_avg_pool2d(mask, 16), theta), atol=0.2)


def test_cia_net_targets_maps_and_truth_share_one_frame_whatever_the_alignment_does() -> None:
    """A grid that lights up where the aligned input is bright: its maps must land on the
    square where the square is in the input, and its targets where the grid sees the square."""
    net = CIANet(num_classes=1, image_size=64, bank_size=4, alignment=True, grid_upsample=1).eval()
    net.set_references(_bank_images(4, 64))
    _shifted_alignment(net)

    def features(x: torch.Tensor):  # the aligned input, pooled to an 8 x 8 grid, as "features"
        (aligned, theta), _ = net._aligned(x), None
        pooled = F.adaptive_avg_pool2d(aligned, 8)
        return pooled.expand(-1, 512, -1, -1), torch.ones_like(pooled), aligned, theta

    net.weighted_features = features
    with torch.no_grad():
        for conv in (net.head[0], net.head[2]):
            conv.weight.zero_()
            conv.bias.zero_()
        net.head[0].weight[0, 0] = 1.0
        net.head[2].weight[0, 0] = 20.0
        net.head[2].bias.fill_(-10.0)  # above 0.5 where the cell is more than half square
    image = _square()
    _, maps = net.class_maps(image)
    found = F.interpolate(maps, size=(64, 64), mode="nearest")[0, 0] >= 0.5
    truth = image[0, 0] >= 0.5
    overlap = (found & truth).sum() / (found | truth).sum()
    assert overlap > 0.5, f"IoU of the map with the square {overlap:.2f}"
    # Targets: the cells over the square as the grid sees it (in the aligned frame).
    outputs = net(image, train_outputs=True)
    cells = grid_targets(image, outputs.theta, outputs.grid.shape[-2:])
    seen = F.adaptive_avg_pool2d(outputs.aligned, 8) > 0.01
    assert cells.bool().equal(seen)
    # the input's frame differs
    assert not cells.bool().equal(F.adaptive_max_pool2d(image, 8) > 0.01)


def test_class_attention_weights_paper_grow_with_the_dataset_balanced_do_not() -> None:
    """The same class proportions at 1,800 and 18,000 images: the paper's c_i grow tenfold,
    the balanced ones stay, and weigh each class's positives as its negatives."""
    small, total = [300, 120, 60, 20], 1800
    large = [10 * n for n in small]
    paper_small, paper_large = class_attention_weights(small), class_attention_weights(large)
    assert paper_large.tolist() == pytest.approx((10 * paper_small).tolist(), rel=1e-5)
    balanced_small = class_attention_weights(small, "balanced", total)
    balanced_large = class_attention_weights(large, "balanced", 10 * total)
    assert balanced_large.tolist() == pytest.approx(balanced_small.tolist(), rel=1e-5)
    for n, c in zip(small, balanced_small.tolist()):
        assert n * c == pytest.approx(total - n, rel=1e-5)
    with pytest.raises(ValueError, match="number of training images"):
        class_attention_weights(small, "balanced")


def _bank_images(n: int, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(n, 1, size, size, generator=generator) * 255).to(torch.uint8)


def test_hash_sampling_pairs_an_input_with_its_most_similar_normal_image() -> None:
    net = CIANet(num_classes=2, image_size=32, bank_size=8, alignment=False).eval()
    normals = _bank_images(8)
    net.set_references(normals)
    bank = net.bank.float() / 255
    x = (bank[[5, 2]] + 0.02 * torch.randn(2, 1, 32, 32)).clamp(0, 1)  # near two bank images
    assert torch.equal(net.negatives(x), bank[[5, 2]])
    # A bank image itself is paired with its nearest *other* image.
    codes = net.bank_codes
    similarity = codes[3] @ codes.T
    similarity[3] = -2
    assert torch.equal(net.negatives(bank[[3]]), bank[[int(similarity.argmax())]])


def test_canonical_sampling_uses_the_mean_normal_image_and_random_is_repeatable() -> None:
    normals = _bank_images(6)
    canonical = CIANet(
        num_classes=2, image_size=32, bank_size=4, negative_sampling="canonical", alignment=False
    ).eval()
    canonical.set_references(normals)
    assert torch.allclose(canonical.canonical[0], normals.float().mean(dim=0) / 255)
    assert torch.allclose(
        canonical.negatives(torch.rand(3, 1, 32, 32)), canonical.canonical.expand(3, -1, -1, -1)
    )
    random = CIANet(
        num_classes=2, image_size=32, bank_size=4, negative_sampling="random", alignment=False
    ).eval()
    random.set_references(normals)
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(random.negatives(x), random.negatives(x))


def test_contrast_attention_is_normalised_to_the_grid_size_and_needs_references() -> None:
    net = CIANet(num_classes=3, image_size=64, bank_size=4).eval()
    with pytest.raises(RuntimeError, match="set_references"):
        net(torch.rand(1, 1, 64, 64))
    net.set_references(_bank_images(5, 64))
    out = net(torch.rand(2, 1, 64, 64), train_outputs=True)
    h, w = out.grid.shape[-2:]
    assert out.grid.shape[:2] == (2, 3) and out.attention.shape == (2, 1, h, w)
    assert torch.allclose(
        out.attention.flatten(1).sum(dim=1), torch.full((2,), float(h * w)), rtol=1e-4
    )
    logits, maps = net.class_maps(torch.rand(2, 1, 64, 64))
    assert (
        logits.shape == (2, 3)
        and maps.shape == (2, 3, 4 * h, 4 * w)
        and maps.min() >= 0
        and maps.max() <= 1
    )
    with pytest.raises(ValueError, match="at least two normal"):
        net.set_references(_bank_images(1, 64))


def test_variant_state_dicts_round_trip_through_build_network() -> None:
    for architecture, options in (
        ("class_attention", {"dim": 16}),
        (
            "cia_net",
            {
                "image_size": 32,
                "bank_size": 4,
                "negative_sampling": "hash",
                "alignment": True,
                "grid_upsample": 2,
            },
        ),
    ):
        net = build_network(architecture, 4, **options).eval()
        if architecture == "cia_net":
            net.set_references(_bank_images(6))
        copy = build_network(architecture, 4, **options).eval()
        copy.load_state_dict(net.state_dict())
        x = torch.rand(2, 1, 32, 32)
        assert torch.allclose(net(x), copy(x), atol=1e-6)


# --- scores, boxes, localization -----------------------------------------------------------------


def test_class_scores_call_an_image_normal_exactly_when_no_finding_reaches_one_half() -> None:
    p = torch.tensor([[0.2, 0.4, 0.1], [0.7, 0.1, 0.6], [0.49, 0.0, 0.0]])
    scores = class_scores(p, multi_label=True, normal_index=0)
    assert scores.shape == (3, 4)
    assert scores.argmax(dim=1).tolist() == [0, 1, 0]
    assert torch.allclose(scores[:, 0], 1 - p.amax(dim=1)) and torch.equal(scores[:, 1:], p)
    assert torch.equal(class_scores(p, multi_label=False, normal_index=0), p)


def test_keep_boxes_removes_the_boxes_of_a_seeded_share_of_boxed_images() -> None:
    n = 40
    boxes = torch.zeros(n, 2, 4)
    boxes[:30, 0] = torch.tensor([1.0, 1.0, 5.0, 5.0])
    data = Resident(
        torch.zeros(n, 1, 8, 8, dtype=torch.uint8),
        boxes,
        torch.zeros(n, dtype=torch.int64),
        boxes.flatten(1).any(dim=1),
        [str(i) for i in range(n)],
    )
    kept = keep_boxes(data, 0.4, seed=3)
    # the original is untouched
    assert int(kept.has_boxes.sum()) == 12 and int(data.has_boxes.sum()) == 30
    assert (kept.boxes[~kept.has_boxes] == 0).all() and torch.equal(
        kept.boxes[kept.has_boxes], boxes[kept.has_boxes]
    )
    assert torch.equal(keep_boxes(data, 0.4, seed=3).has_boxes, kept.has_boxes)
    assert keep_boxes(data, 1.0, seed=3) is data


def test_localization_accuracy_counts_images_whose_iou_exceeds_each_threshold() -> None:
    truth = np.zeros((3, 10, 10), bool)
    truth[:, 0:4, 0:5] = True  # 20 pixels
    predicted = np.zeros((3, 10, 10), bool)
    predicted[0, 0:4, 0:5] = True  # IoU 1
    predicted[1, 0:4, 0:2] = True  # IoU 8/20 = 0.4
    predicted[2, 5:9, 5:9] = True  # IoU 0
    assert mask_iou(predicted, truth).tolist() == pytest.approx([1.0, 0.4, 0.0])
    result = localization_accuracy(
        predicted, truth, np.array([1, 1, 2]), ("normal", "a", "b"), thresholds=(0.1, 0.4, 0.5)
    )
    assert result["a"] == pytest.approx([1.0, 0.5, 0.5])  # IoU must exceed T: 0.4 is not above 0.4
    assert result["b"] == [0.0, 0.0, 0.0] and "normal" not in result
    assert result["mean"] == pytest.approx([0.5, 0.25, 0.25])
