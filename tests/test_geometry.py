"""Boxes, masks at any resolution, the letterbox mapping and the MONAI dictionary pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Compose

from dp_transforms import (
    BoxesToMaskd,
    Letterbox,
    LetterboxResized,
    LoadChestXrayd,
    as_boxes,
    boxes_to_masks,
    clip_boxes,
    pad_boxes,
    xywh_to_xyxy,
)
from dp_transforms.geometry import resize


def reference_mask(boxes: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Paint integer boxes at ``factor`` times the resolution, then average-pool: the definition."""
    fine = np.zeros((shape[0] * factor, shape[1] * factor), np.float32)
    for x0, y0, x1, y1 in (np.asarray(boxes) * factor).round().astype(int):
        fine[y0:y1, x0:x1] = 1.0
    return F.avg_pool2d(torch.from_numpy(fine)[None, None], factor)[0, 0].numpy()


def test_as_boxes_validates() -> None:
    assert as_boxes(None).shape == (0, 4)
    assert as_boxes([1, 2, 3, 4]).shape == (1, 4)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        as_boxes([[1, 2, 3]])
    with pytest.raises(ValueError, match="max < min"):
        as_boxes([[10, 10, 5, 20]])
    with pytest.raises(ValueError, match="non-finite"):
        as_boxes([[0, 0, np.nan, 1]])


def test_xywh_and_clip() -> None:
    np.testing.assert_array_equal(xywh_to_xyxy([[10, 20, 30, 40]]), [[10, 20, 40, 60]])
    clipped = clip_boxes(
        np.array([[-5, -5, 10, 10], [90, 90, 200, 200], [150, 0, 160, 10]], np.float32), (100, 120)
    )
    np.testing.assert_array_equal(clipped, [[0, 0, 10, 10], [90, 90, 120, 100]])


@pytest.mark.parametrize("mask_side", [224, 56, 28, 7])
def test_masks_at_any_resolution_equal_area_downsampling(mask_side: int) -> None:
    boxes = np.array([[10, 20, 60, 90], [120, 130, 200, 210]], np.float32)
    masks = boxes_to_masks(torch.as_tensor(boxes)[None], (224, 224), (mask_side, mask_side))
    factor = 224 // mask_side
    expected = F.avg_pool2d(
        torch.as_tensor(reference_mask(boxes, (224, 224), 1))[None, None], factor
    )[0, 0]
    np.testing.assert_allclose(masks[0, 0].numpy(), expected.numpy(), atol=1e-5)


def test_fractional_box_edges_cover_partial_pixels() -> None:
    mask = boxes_to_masks(torch.tensor([[[1.5, 0.0, 3.25, 1.0]]]), (2, 4))[0, 0]
    np.testing.assert_allclose(mask.numpy(), [[0, 0.5, 1.0, 0.25], [0, 0, 0, 0]], atol=1e-6)
    fine = reference_mask(np.array([[1.5, 0.0, 3.25, 1.0]]), (2, 4), 4)
    np.testing.assert_allclose(mask.numpy(), fine, atol=1e-6)


def test_images_without_boxes_and_padding_rows() -> None:
    batch = pad_boxes(
        [np.zeros((0, 4), np.float32), np.array([[0, 0, 4, 4], [4, 4, 8, 8]], np.float32)]
    )
    assert batch.shape == (2, 2, 4)
    masks = boxes_to_masks(batch, (8, 8))
    assert float(masks[0].sum()) == 0.0  # a normal image: mask+ empty, so mask- is all ones
    assert float(masks[1].sum()) == 32.0


def test_letterbox_maps_boxes_both_ways_and_pads_symmetrically() -> None:
    geometry = Letterbox((1000, 800), 224)
    assert geometry.content_shape == (224, 179)
    assert geometry.offset == (0, 22)
    boxes = np.array([[100, 200, 400, 600], [0, 0, 800, 1000]], np.float32)
    canvas = geometry.boxes_to_canvas(boxes)
    np.testing.assert_allclose(canvas[1], [22, 0, 22 + 179, 224], atol=1e-4)
    np.testing.assert_allclose(geometry.boxes_to_source(canvas), boxes, atol=1e-3)


def test_letterbox_image_content_lands_under_its_boxes() -> None:
    image = np.zeros((1, 300, 500), np.float32)
    image[:, 100:200, 50:150] = 1.0
    geometry = Letterbox((300, 500), 100)
    canvas = geometry.image_to_canvas(image)
    assert canvas.shape == (1, 100, 100)
    x0, y0, x1, y1 = (
        geometry.boxes_to_canvas(np.array([[50, 100, 150, 200]], np.float32))[0].round().astype(int)
    )
    inside = canvas[0, y0:y1, x0:x1].mean()
    assert float(inside) > 0.95 and float(canvas.sum()) == pytest.approx(
        float(inside) * (y1 - y0) * (x1 - x0), rel=0.1
    )
    assert float(np.abs(canvas[0, :20]).max()) == 0.0  # the padding above the content


def test_letterbox_canvas_map_returns_to_source_shape() -> None:
    geometry = Letterbox((300, 500), 100)
    heat = np.zeros((1, 25, 25), np.float32)
    heat[0, 10:14, 4:8] = 1.0  # a blob on a quarter-resolution map of the canvas
    back = geometry.canvas_to_source(heat)
    assert back.shape == (1, 300, 500)
    ys, xs = np.nonzero(back[0] > 0.5)
    centre = geometry.boxes_to_source(np.array([[4 * 4, 10 * 4, 8 * 4, 14 * 4]], np.float32))[0]
    assert float(xs.mean()) == pytest.approx((centre[0] + centre[2]) / 2, abs=6)
    assert float(ys.mean()) == pytest.approx((centre[1] + centre[3]) / 2, abs=6)


def test_dictionary_pipeline_on_the_real_radiograph(rg1_path: Path) -> None:
    pipeline = Compose(
        [
            LoadChestXrayd("image", box_keys="boxes"),
            LetterboxResized("image", 224, box_keys="boxes"),
            BoxesToMaskd("image", mask_shape=(56, 56)),
        ]
    )
    out = pipeline({"image": str(rg1_path), "boxes": [[300.0, 500.0, 800.0, 1100.0]]})
    assert out["image"].shape == (1, 224, 224)
    assert out["mask"].shape == out["mask_neg"].shape == (1, 56, 56)
    torch.testing.assert_close(out["mask"] + out["mask_neg"], torch.ones(1, 56, 56))
    x0, y0, x1, y1 = out["boxes"][0] / 4
    assert float(out["mask"][0, int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1].min()) == 1.0
    assert float(out["mask"].sum()) == pytest.approx(float((x1 - x0) * (y1 - y0)), rel=1e-4)
    assert out["image_letterbox"].source_shape == (1955, 1841)
    assert out["image_meta_dict"]["original_shape"] == (1955, 1841)


def test_letterboxd_refuses_keys_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="has shape"):
        LetterboxResized(("a", "b"), 32)({"a": torch.zeros(1, 40, 40), "b": torch.zeros(1, 50, 40)})


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ((300, 500), (100, 167)),  # shrinking: antialiased
        ((1955, 1841), (224, 211)),  # a radiograph to the canvas
        ((64, 64), (224, 224)),  # enlarging: plain bilinear
        ((50, 90), (64, 30)),  # one axis enlarged, the other shrunk
        ((17, 13), (17, 40)),  # one axis left as it is
    ],
)
def test_resize_is_pytorchs_antialiased_bilinear_interpolation(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    """The NumPy resampling that the node and training's MONAI transform share gives the
    canvases PyTorch's ``F.interpolate`` gave (the bundles trained before were trained on them)."""
    image = np.random.default_rng(0).random((2, *source), dtype=np.float32)
    shrinking = target[0] < source[0] or target[1] < source[1]
    want = F.interpolate(
        torch.from_numpy(image)[None],
        size=target,
        mode="bilinear",
        align_corners=False,
        antialias=shrinking,
    )[0].numpy()
    found = resize(image, target)
    assert found.dtype == np.float32 and found.shape == want.shape
    np.testing.assert_allclose(found, want, rtol=0, atol=1e-5)
