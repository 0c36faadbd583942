"""The synthetic generator: anatomy, lesions, long tail, difficulty, determinism, real layouts, DICOM."""

from __future__ import annotations

import csv
import filecmp
import hashlib
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
            inside = layer[
                int(y0) - rows.start : int(y1) - rows.start,
                int(x0) - cols.start : int(x1) - cols.start,
            ].sum()
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
    lobar, broncho, interstitial, cavitary = (
        lesion_stats(k) for k in ("lobar", "bronchopneumonia", "interstitial", "cavitary")
    )
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
    clean = cases(
        replace(SMALL, size=64, difficulty=Difficulty(label_noise=0.0, distractor_rate=0.0)), 60
    )
    assert all(c.recorded_label == c.label for c in clean)
    assert all(c.info["distractors"] == 0 for c in clean)
    noisy = cases(
        replace(SMALL, size=64, difficulty=Difficulty(label_noise=0.5, distractor_rate=4.0)), 60
    )
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
    assert obvious.info["lesion_density"] == pytest.approx(1.5) and normal_like.info[
        "lesion_density"
    ] == pytest.approx(0.2)
    x0, y0, x1, y1 = obvious.true_boxes[0].astype(int)
    assert obvious.pixels[y0:y1, x0:x1].mean() > normal_like.pixels[y0:y1, x0:x1].mean() + 0.03


# --- determinism and layouts --------------------------------------------------------------------


def test_cases_are_deterministic() -> None:
    a, b = render_case(SMALL, 7), render_case(SMALL, 7)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.pixels, render_case(replace(SMALL, seed=1), 7).pixels)


#: What generator version 1 drew before version 2 existed: the data of the tables in
#: docs/results.md. sha256 of the pixels, boxes, true boxes and recorded label of a case.
VERSION_1_CASES = {
    (128, 0): "80d881b26c0fb5f3c3318fe612daed9b9f1232a62cafed19afb13b2aaf5fb452",
    (128, 7): "17771ef6c0013be4cba134932cb7a74b2fed2a2ddb94fab73e3ffc38a6be1efb",
    (256, 3): "d83f73584783621b5ce6f9894b715a2c512d7eaea6b42f04b7309081efd50ac6",
}
#: sha256 of a 12-image version-1 RSNA dataset: its label files and each DICOM file's name,
#: pixel data, patient id, photometric interpretation and SOP class.
VERSION_1_RSNA = "b210824ab662894a9bd4a17766083e0b2b7d147837918211de5465a59c37d8bf"


@pytest.mark.parametrize(("size", "index"), sorted(VERSION_1_CASES))
def test_version_1_draws_the_published_cases_bit_for_bit(size: int, index: int) -> None:
    case = render_case(replace(SMALL, size=size, version=1), index)
    digest = hashlib.sha256(
        case.pixels.tobytes()
        + case.boxes.tobytes()
        + case.true_boxes.tobytes()
        + case.recorded_label.encode()
    )
    assert digest.hexdigest() == VERSION_1_CASES[size, index]


def test_version_1_writes_the_published_rsna_dataset(tmp_path: Path) -> None:
    generate(
        replace(SMALL, num_images=12, size=64, layout="rsna", version=1), tmp_path, progress=False
    )
    digest = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*")):
        if path.suffix == ".csv":
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix == ".dcm":
            ds = dcmread(path)
            digest.update(
                path.name.encode()
                + ds.PixelData
                + f"{ds.PatientID}|{ds.PhotometricInterpretation}|{ds.SOPClassUID}".encode()
            )
    assert digest.hexdigest() == VERSION_1_RSNA


def test_version_2_is_the_default_and_draws_other_images() -> None:
    assert SynthConfig().version == 2
    assert not np.array_equal(
        render_case(SMALL, 0).pixels, render_case(replace(SMALL, version=1), 0).pixels
    )


def test_output_does_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    config = replace(SMALL, num_images=16, size=64)
    generate(replace(config, workers=1), tmp_path / "one", progress=False)
    generate(replace(config, workers=2), tmp_path / "two", progress=False)
    comparison = filecmp.dircmp(tmp_path / "one", tmp_path / "two")
    assert comparison.diff_files == ["synth_config.yaml"]  # it records the worker count
    assert not comparison.left_only and not comparison.right_only
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "one" / "images",
        tmp_path / "two" / "images",
        [p.name for p in (tmp_path / "one" / "images").iterdir()],
        shallow=False,
    )
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
    assert image.pixels.shape == (128, 128) and image.spacing == pytest.approx(
        (430 / 128, 430 / 128), abs=1e-3
    )
    for r in ds:
        assert ((r.boxes >= 0) & (r.boxes <= 128)).all()


def test_rsna_layout_reads_back(tmp_path: Path) -> None:
    generate(replace(SMALL, layout="rsna"), tmp_path, progress=False)
    ds = read_dataset(tmp_path)
    assert ds.name == "rsna" and len(ds) == SMALL.num_images
    labels = Counter(r.labels[0] for r in ds)
    assert (
        labels["Lung Opacity"] > 0 and labels["Normal"] + labels["No Lung Opacity / Not Normal"] > 0
    )
    record = next(r for r in ds if r.labels == ("Lung Opacity",))
    assert len(record.boxes) > 0
    assert dcmread(record.image, stop_before_pixels=True).PatientID == record.patient_id


def test_rsna_patients_own_several_images_and_not_normal_means_an_abnormality(
    tmp_path: Path,
) -> None:
    """Version 2: the file's Patient ID groups a patient's images (which share anatomy), so
    a patient-level split keeps them together; "No Lung Opacity / Not Normal" is an image
    with a non-pneumonia abnormality, and distractors appear on "Normal" images too."""
    config = replace(
        SMALL,
        num_images=60,
        size=64,
        layout="rsna",
        patients_per_image=0.5,
        difficulty=Difficulty(label_noise=0.0, distractor_rate=2.0),
    )
    generate(config, tmp_path, progress=False)
    ds = read_dataset(tmp_path)
    truth = {row["image_id"]: row for row in csv.DictReader((tmp_path / "synth_truth.csv").open())}
    assert len({r.patient_id for r in ds}) <= 31 < len(ds)
    assert all(r.patient_id == truth[r.image_id]["patient_id"] != r.image_id for r in ds)
    split = split_dataset(ds, 0.3, method="patient")
    test_patients = {ds.records[i].patient_id for i in split.test}
    assert not test_patients & {ds.records[i].patient_id for i in split.train}
    for r in ds:
        if r.labels[0] != "Lung Opacity":
            assert (r.labels[0] == "No Lung Opacity / Not Normal") == bool(
                truth[r.image_id]["abnormalities"]
            ), r.image_id
    normal = [r for r in ds if r.labels[0] == "Normal"]
    assert normal and any(int(truth[r.image_id]["distractors"]) > 0 for r in normal)


# --- version 2: what a classifier of block statistics could read without seeing a lesion ---------------


def far_from(boxes: np.ndarray, size: int, margin: int) -> np.ndarray:
    mask = np.ones((size, size), bool)
    for x0, y0, x1, y1 in boxes.astype(int):
        mask[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    return mask


def test_the_window_follows_the_device_and_the_patient_not_the_lesion() -> None:
    """The same case drawn with a faint and with a dense lesion: far from the lesion the
    images agree to the bit in version 2; version 1 windowed each image on its own
    percentiles, so a lesion changed every pixel of the image."""
    faint, dense = (
        Difficulty(lesion_contrast=c, contrast_spread=0.0, pathology_overlap=0.0)
        for c in (0.2, 1.5)
    )
    config = replace(SMALL, size=256)
    index = next(i for i in range(60) if render_case(config, i).label == "lobar")
    for version, equal in ((2, True), (1, False)):
        a, b = (
            render_case(replace(config, version=version, difficulty=d), index)
            for d in (faint, dense)
        )
        # processing smooths over about a twelfth of the image
        far = far_from(b.true_boxes, 256, 100)
        assert far.sum() > 5000
        assert np.array_equal(a.pixels[far], b.pixels[far]) is equal, version


def test_noise_follows_the_anatomy_not_the_lesion() -> None:
    """Two noise draws of one image differ by the noise alone: with and without a dense
    lesion, that difference is the same in version 2, so no lesion shows in the noise. In
    version 1 the noise grew where a lesion attenuated the beam."""
    from dp_model.synth import detector, findings
    from dp_model.synth.render import form_image as form_image_v1

    s = scene(3, res=256)
    anatomy = s.maps.attenuation.copy()
    with_lesion = anatomy.copy()
    (opacity,) = findings.pneumonia("lobar", s, np.random.default_rng(0), 1.5)[:1]
    with_lesion[opacity.window] += opacity.layer
    inside = np.zeros(anatomy.shape, bool)
    inside[opacity.window] = opacity.layer > 0.5 * opacity.layer.max()
    acquisition = detector.acquire(np.random.default_rng(1), s.anatomy)

    def noise(image: np.ndarray, form) -> tuple[np.ndarray, np.ndarray]:
        one, two = (form(image, np.random.default_rng(seed)) for seed in (5, 6))
        return one - two, (one > 0.01) & (one < 0.99) & (two > 0.01) & (two < 0.99)  # unclipped

    for form, same in (
        (lambda image, rng: detector.form_image(image, anatomy, 256, acquisition, rng), True),
        (lambda image, rng: form_image_v1(image, 256, rng), False),
    ):
        (lesion, a), (plain, b) = noise(with_lesion, form), noise(anatomy, form)
        kept = inside & a & b
        assert kept.sum() > 100
        ratio = lesion[kept].std() / plain[kept].std()
        assert bool(abs(ratio - 1.0) < 1e-3) is same, ratio


def focus_statistics(kind: str, n: int = 24) -> dict[str, np.ndarray]:
    """Box area (share of the image), box centre height (0 top, 1 bottom) and mean density
    inside the box, of ``n`` foci of ``kind`` at one lesion contrast."""
    from dp_model.synth import findings

    out: dict[str, list[float]] = {"area": [], "height": [], "density": []}
    for seed in range(n):
        s = scene(200 + seed)
        opacity = findings.pneumonia(kind, s, np.random.default_rng(seed), 1.0)[0]
        x0, y0, x1, y1 = opacity.box()
        out["area"].append((x1 - x0) * (y1 - y0) / s.frame.res**2)
        out["height"].append((y0 + y1) / 2 / s.frame.res)
        rows, cols = opacity.window
        out["density"].append(
            float(
                opacity.layer[
                    int(y0) - rows.start : int(y1) - rows.start,
                    int(x0) - cols.start : int(x1) - cols.start,
                ].mean()
            )
        )
    return {k: np.asarray(v) for k, v in out.items()}


def test_version_2_pneumonia_types_share_size_zone_and_density() -> None:
    """No single statistic separates the types: for every pair of types, the middle halves
    of their box areas, heights and mean densities overlap (version 1's did not: cavities
    were small and high, lobar consolidations large, dense and low)."""
    stats = {
        kind: focus_statistics(kind)
        for kind in ("lobar", "bronchopneumonia", "interstitial", "cavitary")
    }
    for key in ("area", "height", "density"):
        quartiles = {kind: np.percentile(values[key], [25, 75]) for kind, values in stats.items()}
        for a, (low_a, high_a) in quartiles.items():
            for b, (low_b, high_b) in quartiles.items():
                assert low_a < high_b and low_b < high_a, (key, a, b, quartiles)


def test_abnormalities_that_are_not_pneumonia() -> None:
    """Cardiomegaly widens the heart past half the chest; an effusion fills a costophrenic
    angle (low and lateral in the lung); a nodule and an atelectasis band stay in the lungs."""
    from dp_model.synth import findings
    from dp_model.synth.anatomy import lateral_wall

    for seed in range(6):
        s = scene(300 + seed)
        big = findings.enlarged_heart(s.anatomy, np.random.default_rng(seed))
        assert 2 * big.heart[2] / (2 * float(lateral_wall(np.float32(big.dome_right), big))) > 0.5
        (fluid, *_) = findings.effusion(s, np.random.default_rng(seed))
        rows, cols = np.nonzero(fluid.layer > 0.5 * fluid.layer.max())
        u, v = s.frame.local(fluid.window)
        side = np.sign(u[rows, cols].mean())
        assert np.abs(u[rows, cols]).mean() > 0.45 * s.anatomy.thorax_half_width
        assert v[rows, cols].mean() > s.anatomy.dome(int(side)) - 0.05
        for kind in ("nodule", "atelectasis"):
            for opacity in findings.ABNORMAL_OPACITIES[kind](s, np.random.default_rng(seed)):
                outside = opacity.layer * (s.maps.lungs[opacity.window] < 0.05)
                assert outside.sum() < 0.01 * opacity.layer.sum()


def test_csv_layout_with_png_reads_back(tmp_path: Path) -> None:
    generate(replace(SMALL, layout="csv", image_format="png"), tmp_path, progress=False)
    ds = read_dataset(tmp_path / "data.csv")
    assert ds.classes == CLASSES and len(ds) == SMALL.num_images
    assert Image.open(ds.records[0].image).size == (128, 128)


# --- DICOM files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("monochrome1", [False, True])
@pytest.mark.parametrize("dx", [False, True])
def test_dicom_files_load_back_to_the_rendered_pixels(
    tmp_path: Path, monochrome1: bool, dx: bool
) -> None:
    case = render_case(SMALL, 3)
    path = tmp_path / "x.dcm"
    build_dataset(case, 0, monochrome1, dx, "P1").save_as(path, enforce_file_format=True)
    np.testing.assert_allclose(read_dicom(path).pixels, case.pixels, atol=0.6 / 4095)


@pytest.mark.tools
@pytest.mark.parametrize(
    ("monochrome1", "dx"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_dicom_files_pass_dciodvfy(tmp_path: Path, monochrome1: bool, dx: bool) -> None:
    path = tmp_path / "x.dcm"
    build_dataset(render_case(SMALL, 5), 0, monochrome1, dx, "P1").save_as(
        path, enforce_file_format=True
    )
    result = run_tool("dciodvfy", path, check=False)
    report = result.stdout + result.stderr
    assert ("DXImageForPresentation" if dx else "CRImage") in report
    assert "Error" not in report, report
    # OHIF's renderer refuses an explicit VOI LUT Function (a white image, "Invalid VOI LUT
    # function"); LINEAR is the default without one.
    assert "VOILUTFunction" not in dcmread(path)


# --- command line and pictures --------------------------------------------------------------------


def test_cli_writes_a_dataset_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        synth_main(
            [
                "--out",
                str(tmp_path / "d"),
                "--num-images",
                "12",
                "--size",
                "64",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    assert "12 synthetic images" in capsys.readouterr().out
    assert synth_main(["--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert synth_main(["--out", str(tmp_path / "e"), "--label-noise", "0.9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label_noise must be in [0, 0.5], got 0.9" in err
    assert (
        synth_main(
            ["--out", str(tmp_path / "f"), "--layout", "rsna", "--image-format", "png", "--quiet"]
        )
        == 2
    )
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
    # outlines in several panels
    assert columns.size and columns.max() - columns.min() > image.size[0] * 0.6


def test_a_pacemaker_is_a_device_abnormality_with_a_lead_to_the_heart() -> None:
    """A device is one of RSNA's "Not Normal" findings: a dense generator under a clavicle,
    lateral, and a lead that ends over the heart."""
    from dp_model.synth import findings

    assert "pacemaker" in findings.ABNORMALITIES
    for seed in range(4):
        s = scene(400 + seed)
        parts = findings.ABNORMAL_OPACITIES["pacemaker"](s, np.random.default_rng(seed))
        layer = np.zeros(s.maps.lungs.shape, np.float32)
        for opacity in parts:
            layer[opacity.window] += opacity.layer
        assert layer.max() > 0.5  # metal: denser than any lesion
        u, v = s.frame.grids
        can = layer > 0.5 * layer.max()
        # under a clavicle, lateral
        assert np.abs(u[can]).mean() > 0.3 and v[can].mean() < s.anatomy.heart[1] - 0.3
        cx, cy, rx, ry, _ = s.anatomy.heart
        over_heart = (np.hypot((u - cx) / rx, (v - cy) / ry) < 1.0) & (layer > 0.1)
        assert over_heart.any()
        assert not any(opacity.boxed for opacity in parts)
