"""Batched random augmentation: per-sample randomness, seeding, joint geometry, references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dp_transforms import (
    RandChestAffine,
    RandChestAffined,
    RandChestIntensity,
    RandChestIntensityd,
    SimCLRViews,
    boxes_to_masks,
    gaussian_blur,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def phantom(
    batch: int = 6, size: int = 64, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of identical images with a bright square lesion, and its mask."""
    image = torch.full((batch, 1, size, size), 0.3, device=device)
    image[:, :, 20:36, 28:44] = 0.9
    boxes = torch.tensor([[[28.0, 20.0, 44.0, 36.0]]], device=device).expand(batch, 1, 4)
    return image, boxes_to_masks(boxes, (size, size))


@pytest.mark.parametrize("device", DEVICES)
def test_each_sample_gets_its_own_geometry(device: str) -> None:
    image, _ = phantom(device=device)
    out = RandChestAffine().set_random_state(0)(image)
    assert out.device.type == device and out.shape == image.shape
    pairwise = [(out[i] - out[j]).abs().mean().item() for i in range(6) for j in range(i + 1, 6)]
    assert min(pairwise) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_image_and_mask_move_together(device: str) -> None:
    image, mask = phantom(device=device)
    out_image, out_mask = RandChestAffine(scale=(0.5, 1.0), rotate_degrees=10).set_random_state(3)(
        image, mask
    )
    for i in range(image.shape[0]):
        inside = out_image[i][out_mask[i] > 0.9]
        outside = out_image[i][(out_mask[i] < 0.1) & (out_image[i] > 0)]
        assert inside.numel() > 0
        assert float(inside.mean()) > 0.85 and float(outside.mean()) < 0.35


def test_seeded_runs_repeat_and_seeds_differ() -> None:
    image, _ = phantom()
    a = RandChestAffine().set_random_state(7)(image)
    b = RandChestAffine().set_random_state(7)(image)
    c = RandChestAffine().set_random_state(8)(image)
    torch.testing.assert_close(a, b)
    assert float((a - c).abs().mean()) > 1e-3


def test_identity_parameters_leave_the_image_unchanged() -> None:
    image, _ = phantom()
    out = RandChestAffine(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_degrees=0).set_random_state(0)(
        image
    )
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)


def test_flip_is_off_unless_asked_for_and_then_mirrors() -> None:
    image = torch.rand(4, 1, 32, 48)
    fixed = dict(scale=(1.0, 1.0), ratio=(1.5, 1.5), rotate_degrees=0)
    # area 1 and the image's own aspect ratio (48 / 32): the crop is the whole image
    unflipped = RandChestAffine(**fixed).set_random_state(0)(image)
    torch.testing.assert_close(unflipped, image, atol=1e-5, rtol=0)
    flipped = RandChestAffine(flip_prob=1.0, **fixed).set_random_state(0)(image)
    torch.testing.assert_close(flipped, image.flip(-1), atol=1e-5, rtol=0)


def test_rotation_is_true_in_pixel_space_on_non_square_images() -> None:
    height, width = 60, 120
    image = torch.zeros(1, 1, height, width)
    image[0, 0, 30 - 1 : 30 + 1, 90 - 1 : 90 + 1] = 1.0  # a dot 30 px right of the centre
    affine = RandChestAffine(
        scale=(1.0, 1.0), ratio=(2.0, 2.0), rotate_degrees=10
    ).set_random_state(0)
    affine.randomize(1)
    angle = math.radians(8.0)
    affine._params["angle"][:] = angle
    out = affine(image, randomize=False)
    ys, xs = torch.nonzero(out[0, 0] > 0.05, as_tuple=True)
    weights = out[0, 0][ys, xs]
    cy = float((ys.float() * weights).sum() / weights.sum()) + 0.5 - height / 2
    cx = float((xs.float() * weights).sum() / weights.sum()) + 0.5 - width / 2
    # The grid maps output to input by the rotation, so content turns by -angle; in
    # pixel space the dot stays 30 px from the centre (no stretch from the 2:1 aspect).
    assert cx == pytest.approx(30 * math.cos(angle), abs=0.3)
    assert cy == pytest.approx(-30 * math.sin(angle), abs=0.3)


def test_output_size_and_single_image_input() -> None:
    out = RandChestAffine(output_size=(32, 32)).set_random_state(0)(torch.rand(1, 64, 64))
    assert out.shape == (1, 32, 32)


def test_invalid_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="scale"):
        RandChestAffine(scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="rotate_degrees"):
        RandChestAffine(rotate_degrees=-1)
    with pytest.raises(ValueError, match="gamma"):
        RandChestIntensity(gamma=(0, 1))


def test_intensity_gamma_contrast_brightness_match_their_formulas() -> None:
    image = torch.rand(5, 1, 16, 16)
    t = RandChestIntensity(blur_prob=0, noise_prob=0).set_random_state(0)
    out = t(image)
    p = t._params
    x = image.clamp(1e-6, 1) ** torch.as_tensor(p["gamma"], dtype=torch.float32).view(-1, 1, 1, 1)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    x = (x - mean) * torch.as_tensor(p["contrast"], dtype=torch.float32).view(-1, 1, 1, 1) + mean
    x = x + torch.as_tensor(p["brightness"], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x.clamp(0, 1), atol=1e-5, rtol=0)
    assert len(set(np.round(p["gamma"], 6))) == 5  # per-sample values


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_blur_matches_torchvision(sigma: float) -> None:
    image = torch.rand(1, 1, 40, 40)
    ours = gaussian_blur(image, torch.tensor([sigma]))
    radius = max(1, math.ceil(3 * sigma))
    reference = TF.gaussian_blur(image, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_gaussian_blur_per_sample_sigma_zero_is_identity() -> None:
    image = torch.rand(2, 1, 20, 20)
    out = gaussian_blur(image, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(out[0], image[0])
    assert float((out[1] - image[1]).abs().mean()) > 1e-3


def test_noise_is_seeded_and_images_stay_in_range() -> None:
    image = torch.rand(3, 1, 32, 32)
    kwargs = dict(noise_prob=1.0, noise_std=(0.05, 0.05), blur_prob=0.0)
    a = RandChestIntensity(**kwargs).set_random_state(1)(image)
    b = RandChestIntensity(**kwargs).set_random_state(1)(image)
    torch.testing.assert_close(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_simclr_views_differ_from_each_other_and_are_single_channel() -> None:
    image, _ = phantom(batch=4)
    v1, v2 = SimCLRViews().set_random_state(0)(image)
    assert v1.shape == v2.shape == image.shape
    assert float((v1 - v2).abs().mean()) > 1e-2
    w1, w2 = SimCLRViews().set_random_state(0)(image)
    torch.testing.assert_close(v1, w1)
    torch.testing.assert_close(v2, w2)


def test_dictionary_wrappers_share_geometry_and_leave_masks_unjittered() -> None:
    image, mask = phantom(batch=4)
    data = RandChestAffined(("image", "mask"), scale=(0.6, 1.0)).set_random_state(0)(
        {"image": image, "mask": mask}
    )
    expected_image, expected_mask = RandChestAffine(scale=(0.6, 1.0)).set_random_state(0)(
        image, mask
    )
    torch.testing.assert_close(data["image"], expected_image)
    torch.testing.assert_close(data["mask"], expected_mask)
    jittered = RandChestIntensityd("image").set_random_state(0)(data)
    assert jittered["mask"] is data["mask"]
    assert float((jittered["image"] - data["image"]).abs().mean()) > 1e-3
