"""The synthetic generator: anatomy, lesions, long tail, difficulty, determinism, real layouts, DICOM."""

from __future__ import annotations

import filecmp
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import run_tool
from PIL import Image
from pydicom import dcmread

from dp_model.datasets import read_dataset, split_dataset
from dp_model.synth import CLASSES, Difficulty, SynthConfig, generate
from dp_model.synth.anatomy import render_anatomy, sample_anatomy
from dp_model.synth.cli import main as synth_main
from dp_model.synth.dicom import build_dataset
from dp_model.synth.frame import Frame
from dp_model.synth.gallery import write_augmentations, write_gallery
from dp_model.synth.lesions import LESIONS, Scene
from dp_model.synth.render import _sample_class, render_case
from dp_transforms import read_dicom

SMALL = SynthConfig(num_images=40, size=128, workers=1)


def cases(config: SynthConfig, n: int) -> list:
    return [render_case(config, i) for i in range(n)]


# --- anatomy and lesions ----------------------------------------------------------------------


def test_synthetic_lungs_are_darker_than_the_mediastinum_like_the_real_film() -> None:
    config = replace(SMALL, size=256)
    for case in cases(config, 12):
        p = case.pixels
        lungs = min(p[90:150, 50:90].mean(), p[90:150, 166:206].mean())
        mediastinum = p[60:140, 120:136].mean()
        assert lungs < mediastinum - 0.15, case.index


def scene(seed: int, res: int = 192) -> Scene:
    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng)
    frame = Frame(res)
    return Scene(anatomy, render_anatomy(anatomy, frame, rng), frame)


@pytest.mark.parametrize("kind", sorted(LESIONS))
def test_lesions_stay_in_the_lungs_and_inside_their_boxes(kind: str) -> None:
    for seed in range(6):
        s = scene(seed)
        for opacity in LESIONS[kind](s, np.random.default_rng(seed), 1.0):
            layer = np.clip(opacity.layer, 0, None)
            lungs = s.maps.lungs[opacity.window]
            assert (layer * (lungs < 0.05)).sum() < 0.01 * max(layer.sum(), 1e-6)
            x0, y0, x1, y1 = opacity.box()
            rows, cols = opacity.window
            inside = layer[int(y0) - rows.start : int(y1) - rows.start, int(x0) - cols.start : int(x1) - cols.start].sum()
            assert inside >= 0.85 * layer.sum()


def lesion_stats(kind: str, n: int = 16) -> tuple[float, float]:
    """Median box area (fraction of the image) and median box centre height (0 top, 1 bottom)."""
    areas, heights = [], []
    for seed in range(n):
        s = scene(100 + seed)
        for opacity in LESIONS[kind](s, np.random.default_rng(seed), 1.0):
            x0, y0, x1, y1 = opacity.box()
            areas.append((x1 - x0) * (y1 - y0) / s.frame.res**2)
            heights.append((y0 + y1) / 2 / s.frame.res)
    return float(np.median(areas)), float(np.median(heights))


def test_each_lesion_type_has_its_own_size_and_location() -> None:
    lobar, broncho, interstitial, cavitary = (lesion_stats(k) for k in ("lobar", "bronchopneumonia", "interstitial", "cavitary"))
    assert cavitary[0] < broncho[0] < lobar[0]  # small round cavities, clusters, whole lobes
    assert interstitial[0] > broncho[0]  # diffuse
    assert cavitary[1] < lobar[1] and cavitary[1] < broncho[1]  # cavities sit higher


# --- class distribution, difficulty and label noise ---------------------------------------------


def test_classes_are_long_tailed_with_normal_the_majority() -> None:
    rng = np.random.default_rng(0)
    counts = Counter(_sample_class(rng, SynthConfig()) for _ in range(20000))
    assert counts.most_common(1)[0][0] == "normal" and counts["normal"] > 0.5 * 20000
    ratio = counts["cavitary"] / counts["normal"]
    assert 0.035 < ratio < 0.07  # the rarest about 1/20 of normal
    assert [counts[c] for c in CLASSES] == sorted((counts[c] for c in CLASSES), reverse=True)


def test_label_noise_and_distractor_controls() -> None:
    clean = cases(replace(SMALL, size=64, difficulty=Difficulty(label_noise=0.0, distractor_rate=0.0)), 60)
    assert all(c.recorded_label == c.label for c in clean)
    assert all(c.info["distractors"] == 0 for c in clean)
    noisy = cases(replace(SMALL, size=64, difficulty=Difficulty(label_noise=0.5, distractor_rate=4.0)), 60)
    wrong = sum(c.recorded_label != c.label for c in noisy)
    assert 15 <= wrong <= 45
    assert np.mean([c.info["distractors"] for c in noisy]) > 2.5
    for case in noisy:
        if case.recorded_label == "normal":
            assert len(case.boxes) == 0  # a missed lesion carries no box


def test_lesion_contrast_control_changes_what_is_drawn() -> None:
    faint = replace(SMALL, difficulty=Difficulty(lesion_contrast=0.2, contrast_spread=0.0))
    strong = replace(SMALL, difficulty=Difficulty(lesion_contrast=1.5, contrast_spread=0.0))
    index = next(i for i in range(50) if render_case(SMALL, i).label == "lobar")
    normal_like = render_case(faint, index)
    obvious = render_case(strong, index)
    assert obvious.info["lesion_density"] == pytest.approx(1.5) and normal_like.info["lesion_density"] == pytest.approx(0.2)
    x0, y0, x1, y1 = obvious.true_boxes[0].astype(int)
    assert obvious.pixels[y0:y1, x0:x1].mean() > normal_like.pixels[y0:y1, x0:x1].mean() + 0.03


# --- determinism and layouts --------------------------------------------------------------------


def test_cases_are_deterministic() -> None:
    a, b = render_case(SMALL, 7), render_case(SMALL, 7)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.pixels, render_case(replace(SMALL, seed=1), 7).pixels)


def test_output_does_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    config = replace(SMALL, num_images=16, size=64)
    generate(replace(config, workers=1), tmp_path / "one", progress=False)
    generate(replace(config, workers=2), tmp_path / "two", progress=False)
    comparison = filecmp.dircmp(tmp_path / "one", tmp_path / "two")
    assert comparison.diff_files == ["synth_config.yaml"]  # it records the worker count
    assert not comparison.left_only and not comparison.right_only
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "one" / "images", tmp_path / "two" / "images", [p.name for p in (tmp_path / "one" / "images").iterdir()], shallow=False)
    assert not mismatch and not errors


def test_deep_pneumonia_layout_reads_back(tmp_path: Path) -> None:
    summary = generate(SMALL, tmp_path, progress=False)
    ds = read_dataset(tmp_path)
    assert ds.name == "deep-pneumonia" and ds.classes == CLASSES and len(ds) == SMALL.num_images
    assert ds.class_counts() == {c: summary.class_counts.get(c, 0) for c in CLASSES}
    assert any(len(r.boxes) for r in ds)
    assert len({r.patient_id for r in ds}) < len(ds)  # follow-up images share patients
    split = split_dataset(ds, 0.1)
    assert split.method == "patient"
    image = read_dicom(ds.records[0].image)
    assert image.pixels.shape == (128, 128) and image.spacing == pytest.approx((430 / 128, 430 / 128), abs=1e-3)
    for r in ds:
        assert ((r.boxes >= 0) & (r.boxes <= 128)).all()


def test_rsna_layout_reads_back(tmp_path: Path) -> None:
    generate(replace(SMALL, layout="rsna"), tmp_path, progress=False)
    ds = read_dataset(tmp_path)
    assert ds.name == "rsna" and len(ds) == SMALL.num_images
    labels = Counter(r.labels[0] for r in ds)
    assert labels["Lung Opacity"] > 0 and labels["Normal"] + labels["No Lung Opacity / Not Normal"] > 0
    record = next(r for r in ds if r.labels == ("Lung Opacity",))
    assert len(record.boxes) > 0
    assert dcmread(record.image, stop_before_pixels=True).PatientID == record.image_id


def test_csv_layout_with_png_reads_back(tmp_path: Path) -> None:
    generate(replace(SMALL, layout="csv", image_format="png"), tmp_path, progress=False)
    ds = read_dataset(tmp_path / "data.csv")
    assert ds.classes == CLASSES and len(ds) == SMALL.num_images
    assert Image.open(ds.records[0].image).size == (128, 128)


# --- DICOM files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("monochrome1", [False, True])
@pytest.mark.parametrize("dx", [False, True])
def test_dicom_files_load_back_to_the_rendered_pixels(tmp_path: Path, monochrome1: bool, dx: bool) -> None:
    case = render_case(SMALL, 3)
    path = tmp_path / "x.dcm"
    build_dataset(case, 0, monochrome1, dx, "P1").save_as(path, enforce_file_format=True)
    np.testing.assert_allclose(read_dicom(path).pixels, case.pixels, atol=0.6 / 4095)


@pytest.mark.tools
@pytest.mark.parametrize(("monochrome1", "dx"), [(False, False), (True, False), (False, True), (True, True)])
def test_dicom_files_pass_dciodvfy(tmp_path: Path, monochrome1: bool, dx: bool) -> None:
    path = tmp_path / "x.dcm"
    build_dataset(render_case(SMALL, 5), 0, monochrome1, dx, "P1").save_as(path, enforce_file_format=True)
    result = run_tool("dciodvfy", path, check=False)
    report = result.stdout + result.stderr
    assert ("DXImageForPresentation" if dx else "CRImage") in report
    assert "Error" not in report, report
    # OHIF's renderer refuses an explicit VOI LUT Function (a white image, "Invalid VOI LUT
    # function"); LINEAR is the default without one.
    assert "VOILUTFunction" not in dcmread(path)


# --- command line and pictures --------------------------------------------------------------------


def test_cli_writes_a_dataset_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert synth_main(["--out", str(tmp_path / "d"), "--num-images", "12", "--size", "64", "--workers", "1", "--quiet"]) == 0
    assert "12 synthetic images" in capsys.readouterr().out
    assert synth_main(["--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert synth_main(["--out", str(tmp_path / "e"), "--label-noise", "0.9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label_noise must be in [0, 0.5], got 0.9" in err
    assert synth_main(["--out", str(tmp_path / "f"), "--layout", "rsna", "--image-format", "png", "--quiet"]) == 2
    assert "rsna layout holds DICOM" in capsys.readouterr().err


def test_gallery_picture(tmp_path: Path) -> None:
    path = write_gallery(replace(SMALL, size=96), tmp_path / "g.png", per_class=1, size=96)
    image = Image.open(path)
    assert image.size[0] > 200 and image.size[1] > 5 * 100
    pixels = np.asarray(image.convert("RGB"), np.int16)
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 80)).sum() > 20  # red lesion boxes are drawn


def test_augmentation_picture_outlines_the_moved_mask(tmp_path: Path) -> None:
    image = Image.open(write_augmentations(SMALL, tmp_path / "a.png", size=96))
    pixels = np.asarray(image.convert("RGB"), np.int16)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    columns = np.flatnonzero(red.any(axis=0))
    assert columns.size and columns.max() - columns.min() > image.size[0] * 0.6  # outlines in several panels
