"""Each loss against a direct re-computation of the paper's equation on small tensors."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from dp_model.networks.losses import (
    CBFocalLoss,
    MGACRLoss,
    SqrtFocalLoss,
    attention_losses,
    cb_focal_loss,
    class_balanced_weights,
    feature_cr_loss,
    inverse_sqrt_weights,
    mgacr_loss,
    nt_xent,
    relative_scale,
)
from dp_model.networks.networks import StageOutput

torch.manual_seed(0)


# --- NT-Xent (Eq. 1) ---------------------------------------------------------------------------


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """Eq. 1 term by term: -log(exp(sim(i, j) / tau) / sum over k != i of exp(sim(i, k) / tau))."""
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n2, n = len(z), len(z1)
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        numerator = math.exp(float(z[i] @ z[j]) / tau)
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(numerator / denominator)
    return total / n2


@pytest.mark.parametrize("tau", [0.2, 0.5, 1.0])
def test_nt_xent_matches_equation_1(tau: float) -> None:
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(nt_xent_reference(z1, z2, tau), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_high_for_unrelated_ones() -> None:
    z = torch.randn(16, 32)
    assert (
        float(nt_xent(z, z + 0.01 * torch.randn_like(z)))
        < float(nt_xent(z, torch.randn(16, 32))) - 1.0
    )


def test_nt_xent_is_stable_and_float32_under_bf16_autocast() -> None:
    z1, z2 = (1e4 * torch.randn(8, 16)).requires_grad_(), 1e4 * torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z1.grad).all()


def _ddp_worker(
    rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict
) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = z1.shape[0] // world
    part1 = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(part1, z2[rank * n : (rank + 1) * n], 0.2, gather=True)
    loss.backward()
    out[rank] = (float(loss), part1.grad.clone())
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nt_xent_gathered_across_two_processes_equals_one_process() -> None:
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), z1, z2, out), nprocs=2, join=True)
        results = dict(out)
    full = z1.clone().requires_grad_()
    single = nt_xent(full, z2, 0.2)
    single.backward()
    single = single.detach()
    # Each process averages over its own rows; the global loss is the mean of the two.
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(single.item(), rel=1e-5)
    # DDP averages gradients over processes: each process's gradient is half the global one.
    torch.testing.assert_close(
        torch.cat([results[0][1], results[1][1]]) / 2, full.grad, rtol=1e-4, atol=1e-6
    )


# --- MGACR (Eq. 2-6) -----------------------------------------------------------------------------


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def test_attention_losses_match_equations_2_and_3() -> None:
    map_pos, map_neg = torch.rand(3, 1, 7, 7), torch.rand(3, 1, 7, 7)
    mask = (torch.rand(3, 1, 7, 7) > 0.6).float()
    att_pos, att_neg = attention_losses(map_pos, map_neg, mask)
    for i in range(3):
        assert float(att_pos[i]) == pytest.approx(
            mse(map_pos[i], mask[i]) / mse(map_pos[i], 1 - mask[i]), rel=1e-5
        )
        assert float(att_neg[i]) == pytest.approx(mse(map_neg[i], 1 - mask[i]), rel=1e-5)


def test_feature_cr_loss_matches_equation_5() -> None:
    f = torch.randn(2, 4, 5, 5)
    map_pos, map_neg = torch.rand(2, 1, 5, 5), torch.rand(2, 1, 5, 5)
    loss = feature_cr_loss(f, map_pos, map_neg)
    for i in range(2):
        assert float(loss[i]) == pytest.approx(
            l1(f[i], f[i] * map_pos[i]) / l1(f[i], f[i] * map_neg[i]), rel=1e-5
        )


def test_ratio_denominators_are_guarded() -> None:
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    # map+ exactly equal to mask-: Eq. 2's denominator is zero.
    att_pos, _ = attention_losses(1 - mask, torch.rand(1, 1, 4, 4), mask, eps=1e-3)
    assert torch.isfinite(att_pos).all() and float(att_pos[0]) == pytest.approx(1.0 / 1e-3)
    # map- all ones: Eq. 5's denominator is zero.
    feat = feature_cr_loss(
        torch.randn(1, 3, 4, 4), torch.rand(1, 1, 4, 4), torch.ones(1, 1, 4, 4), eps=1e-3
    )
    assert torch.isfinite(feat).all()


def stages(batch: int = 4, requires_grad: bool = False) -> list[StageOutput]:
    out = []
    for size, channels in ((8, 4), (4, 6)):
        map_pos = torch.rand(batch, 1, size, size, requires_grad=requires_grad)
        map_neg = torch.rand(batch, 1, size, size, requires_grad=requires_grad)
        out.append(StageOutput(torch.randn(batch, channels, size, size), map_pos, map_neg))
    return out


def test_mgacr_loss_averages_stages_and_downsamples_masks_by_area() -> None:
    s = stages()
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 4:20, 8:24] = 1.0
    everyone = torch.ones(4, dtype=torch.bool)
    parts = mgacr_loss(s, mask, everyone, everyone)
    expected_pos, expected_feat = [], []
    for stage in s:
        small = F.avg_pool2d(mask, 32 // stage.map_pos.shape[-1])
        expected_pos.append(attention_losses(stage.map_pos, stage.map_neg, small)[0].mean())
        expected_feat.append(feature_cr_loss(stage.features, stage.map_pos, stage.map_neg).mean())
    assert float(parts["att_pos"]) == pytest.approx(
        float(torch.stack(expected_pos).mean()), rel=1e-5
    )
    assert float(parts["feat_cr"]) == pytest.approx(
        float(torch.stack(expected_feat).mean()), rel=1e-5
    )


def test_images_that_do_not_take_part_change_nothing() -> None:
    s = stages()
    mask = (torch.rand(4, 1, 32, 32) > 0.7).float()
    some = torch.tensor([True, False, True, False])
    before = mgacr_loss(s, mask, some, some)
    for stage in s:
        stage.map_pos[1] = torch.rand_like(stage.map_pos[1])
        # leaves, no grad: safe to edit
        stage.features[3] = 10 * torch.randn_like(stage.features[3])
    after = mgacr_loss(s, mask, some, some)
    for key in before:
        assert float(after[key]) == pytest.approx(float(before[key]), rel=1e-6)
    none = mgacr_loss(s, mask, torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    assert all(float(v) == 0.0 for v in none.values())


def test_mgacr_module_handles_normal_and_unboxed_images_deliberately() -> None:
    s = stages(batch=3, requires_grad=True)
    mask = torch.zeros(3, 1, 32, 32)
    mask[0, :, 8:16, 8:16] = 1.0
    has_boxes = torch.tensor([True, False, False])
    is_normal = torch.tensor([False, True, False])  # image 2: a lesion nobody outlined
    total, parts = MGACRLoss(att_weight=0.1, feat_weight=0.1)(s, mask, has_boxes, is_normal)
    total.backward()
    for stage in s:
        # the normal image trains towards an empty mask+
        assert float(stage.map_pos.grad[1].abs().sum()) > 0
        # the unboxed lesion image takes no MGACR term
        assert float(stage.map_pos.grad[2].abs().sum()) == 0
    expected = 0.1 * (parts["att_pos"] + parts["att_neg"]) + 0.1 * parts["feat_cr"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    _, skipped = MGACRLoss(normal_images="skip")(s, mask, has_boxes, is_normal)
    assert skipped["att_pos"].item() != pytest.approx(parts["att_pos"].item())


def _box_stage(
    side: int = 96, box: int = 19, channels: int = 8, requires_grad: bool = True
) -> tuple[StageOutput, torch.Tensor]:
    """One stage whose maps equal the masks of a 4 % box: the optimum of Eq. 2-3."""
    mask = torch.zeros(1, 1, side, side)
    mask[..., 10 : 10 + box, 10 : 10 + box] = 1.0
    features = torch.rand(1, channels, side, side, generator=torch.Generator().manual_seed(0)) + 0.5
    map_pos, map_neg = (
        mask.clone().requires_grad_(requires_grad),
        (1 - mask).clone().requires_grad_(requires_grad),
    )
    return StageOutput(features, map_pos, map_neg), mask


def test_eq5_as_printed_pulls_the_maps_off_the_attention_optimum_and_detached_does_not() -> None:
    """At maps equal to the masks, Eq. 2-3 are at their optimum (zero, zero gradient). As printed,
    Eq. 5 is far from its own there and is smallest with map+ = 1 everywhere; detached, it
    leaves the maps where the attention terms put them."""
    stage, mask = _box_stage()
    everywhere = StageOutput(stage.features, torch.ones_like(mask), torch.zeros_like(mask))
    yes, no = torch.tensor([True]), torch.tensor([False])
    at_masks = mgacr_loss([stage], mask, yes, yes)
    at_ones = mgacr_loss([everywhere], mask, yes, yes)
    assert at_masks["att_pos"].item() == pytest.approx(0.0) and at_masks["feat_cr"].item() > 10.0
    assert at_ones["feat_cr"].item() < 0.01 and at_ones["att_pos"].item() > 10.0
    for form, moves in (("paper", True), ("detached", False)):
        stage, mask = _box_stage()
        total, _ = MGACRLoss(feature_form=form)([stage], mask, yes, no)
        total.backward()
        pull = float(stage.map_pos.grad.abs().sum() + stage.map_neg.grad.abs().sum())
        assert (pull > 1e-3) == moves, (form, pull)
    # The features still learn from the detached form.
    stage, mask = _box_stage()
    features = stage.features.clone().requires_grad_(True)
    feature_cr_loss(features, stage.map_pos, stage.map_neg, form="detached").sum().backward()
    assert float(features.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="feature_form"):
        MGACRLoss(feature_form="log")


def test_relative_mgacr_keeps_one_weight_against_any_classification_weighting() -> None:
    """Class-balanced weights (normalised to sum to C) and the focal factor shrink the
    classification loss; a relative MGACR shrinks with it, so its share stays that of CE."""
    logits, labels = (
        torch.randn(16, 5, generator=torch.Generator().manual_seed(3)),
        torch.tensor([0] * 12 + [1, 2, 3, 4]),
    )
    counts = [9000, 400, 300, 200, 30]
    ce = F.cross_entropy(logits, labels)
    mgacr = torch.tensor(2.0)
    shares = []
    for loss in (
        CBFocalLoss(counts, beta=0.0, gamma=0.0),
        CBFocalLoss(counts, beta=0.9999, gamma=1.0),
        CBFocalLoss(counts, beta=0.9999, gamma=2.0),
    ):
        classification = loss(logits, labels)
        shares.append(
            float(mgacr * relative_scale(classification, logits, labels) / classification)
        )
    assert shares == pytest.approx([float(mgacr / ce)] * 3, rel=1e-5)
    assert not relative_scale(ce.requires_grad_(), logits, labels).requires_grad


# --- Class-balanced focal loss (Eq. 9) -----------------------------------------------------------


def test_class_balanced_weights_follow_the_effective_number() -> None:
    counts, beta = [900, 300, 30, 0], 0.999
    weights = class_balanced_weights(counts, beta)
    raw = [(1 - beta) / (1 - beta ** max(n, 1)) for n in counts]  # zero count: as one image
    expected = [w * len(raw) / sum(raw) for w in raw]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))
    assert float(weights.sum()) == pytest.approx(4.0)
    torch.testing.assert_close(class_balanced_weights(counts, 0.0), torch.ones(4))
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights(counts, 1.0)


def test_cb_focal_softmax_matches_equation_9() -> None:
    logits, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    weights = torch.tensor([0.2, 0.5, 1.0, 1.3, 2.0])
    gamma = 2.0
    p = logits.softmax(1)
    expected = (
        sum(
            -float(weights[t]) * (1 - float(p[i, t])) ** gamma * math.log(float(p[i, t]))
            for i, t in enumerate(target.tolist())
        )
        / 6
    )
    assert float(cb_focal_loss(logits, target, weights, gamma)) == pytest.approx(expected, rel=1e-5)


def test_cb_focal_with_gamma_zero_and_equal_weights_is_cross_entropy() -> None:
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert float(cb_focal_loss(logits, target, torch.ones(5), 0.0)) == pytest.approx(
        float(F.cross_entropy(logits, target)), rel=1e-6
    )


def test_cb_focal_sigmoid_matches_the_reference_form() -> None:
    logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    weights, gamma = torch.tensor([0.5, 1.0, 1.5]), 1.5
    total = 0.0
    for i, t in enumerate(target.tolist()):
        for c in range(3):
            p = 1 / (1 + math.exp(-float(logits[i, c])))
            p_t = p if c == t else 1 - p
            total += float(weights[t]) * (1 - p_t) ** gamma * -math.log(p_t)
    assert float(cb_focal_loss(logits, target, weights, gamma, mode="sigmoid")) == pytest.approx(
        total / 4, rel=1e-5
    )


def test_cb_focal_module_logs_weights_and_runs_in_float32(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        loss = CBFocalLoss([500, 100, 10], beta=0.999, gamma=1.0, class_names=["normal", "a", "b"])
    assert "normal 500 images ->" in caplog.text
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(torch.randn(4, 3).bfloat16(), torch.tensor([0, 1, 2, 1]))
    assert value.dtype == torch.float32
    with pytest.raises(ValueError, match="mode"):
        CBFocalLoss([1, 2], mode="tanh")


# --- the attention-enhanced ResNet-50's modified focal loss (seed 004) ----------------------------


def test_sqrt_focal_matches_the_papers_binary_equation() -> None:
    """Binary case, weights not normalised: -(1/sqrt(n)) alpha (1 - y')^g log y' for pneumonia,
    -(1/sqrt(n)) (1 - alpha) y'^g log(1 - y') for normal, y' the probability of pneumonia."""
    counts, alpha, gamma = [900, 100], 0.3, 2.0  # index 0 normal, 1 pneumonia
    logits = torch.randn(64, 2, dtype=torch.float64)
    target = torch.randint(0, 2, (64,))
    weights = inverse_sqrt_weights(counts, alpha, normal_index=0, normalize=False)
    got = cb_focal_loss(logits.float(), target, weights, gamma)
    y = logits.softmax(dim=1)[:, 1]
    expected = torch.where(
        target == 1,
        -(1 / math.sqrt(counts[1])) * alpha * (1 - y) ** gamma * torch.log(y),
        -(1 / math.sqrt(counts[0])) * (1 - alpha) * y**gamma * torch.log(1 - y),
    ).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sqrt_focal_weights_favour_rare_classes_and_average_one() -> None:
    weights = inverse_sqrt_weights([400, 100, 25], alpha=0.5)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[2] / weights[1] == pytest.approx(2.0) and weights[1] / weights[
        0
    ] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="alpha"):
        inverse_sqrt_weights([1, 2], alpha=1.0)
    module = SqrtFocalLoss([400, 100, 25], alpha=0.5, gamma=0.0)
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    expected = F.cross_entropy(logits, target, weight=module.weights, reduction="none")
    assert module(logits, target).item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_the_lesion_loss_is_smallest_at_the_mask_and_counts_only_where_a_stage_carries_the_head():
    from dp_model.networks.losses import lesion_loss

    stage, mask = _box_stage(side=64, box=16, requires_grad=False)
    cells = torch.nn.functional.adaptive_avg_pool2d(mask, (8, 8))
    right = 8.0 * (2 * cells - 1)  # confident where the box is, on the head's 8 x 8 cells
    assert (
        lesion_loss(right, mask).item() < 0.25 * lesion_loss(torch.zeros(1, 1, 8, 8), mask).item()
    )
    assert lesion_loss(-right, mask).item() > 1.0
    # Resized as the regions are drawn, the right logits put the box's pixels above 0.5 and the rest below.
    drawn = (
        torch.nn.functional.interpolate(
            right.sigmoid(), size=(64, 64), mode="bilinear", align_corners=False
        )
        >= 0.5
    )
    assert float((drawn & mask.bool()).sum() / (drawn | mask.bool()).sum()) > 0.5
    yes = torch.tensor([True])
    headed = StageOutput(
        stage.features,
        stage.map_pos,
        stage.map_neg,
        "layer2",
        torch.zeros(1, 1, 8, 8, requires_grad=True),
    )
    plain_total, plain_parts = MGACRLoss(lesion_weight=2.0)([stage], mask, yes, yes)
    total, parts = MGACRLoss(lesion_weight=2.0)([headed], mask, yes, yes)
    assert "lesion" not in plain_parts
    assert total.item() == pytest.approx(
        plain_total.item() + 2.0 * parts["lesion"].item(), rel=1e-5
    )
    total.backward()
    assert headed.lesion.grad.abs().sum() > 0
    # An image that takes no attention term (a lesion image without boxes) takes no lesion term.
    _, none = MGACRLoss()([headed], mask, torch.tensor([False]), torch.tensor([False]))
    assert none["lesion"].item() == 0.0
