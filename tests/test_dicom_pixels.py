"""The one DICOM-to-pixels conversion, on real files and on datasets built to known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import data_file, make_dataset, run_tool
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML

from dp_transforms import ImageError, ImageErrorReason, load_image, read_dicom
from dp_transforms.dicom import MAX_SIDE, pixel_spacing


def roi(pixels: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    h, w = pixels.shape
    return float(
        pixels[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)].mean()
    )


# --- the real chest radiograph ---------------------------------------------------------


def test_rg1_lungs_darker_than_mediastinum_and_spine(rg1_path: Path) -> None:
    image = load_image(rg1_path)
    assert image.pixels.shape == (1955, 1841)
    assert image.pixels.dtype == np.float32
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    right_lung = roi(image.pixels, (0.25, 0.55), (0.15, 0.35))
    left_lung = roi(image.pixels, (0.25, 0.55), (0.65, 0.85))
    spine_mediastinum = roi(image.pixels, (0.20, 0.70), (0.46, 0.54))
    # MONOCHROME1 is inverted on loading: lungs (air) dark, mediastinum and spine bright.
    assert right_lung < spine_mediastinum - 0.15
    assert left_lung < spine_mediastinum - 0.15


def test_rg1_pixel_spacing_of_zero_counts_as_unknown(rg1_path: Path) -> None:
    # The file carries Pixel Spacing 0\0, as some real CR readers write.
    assert load_image(rg1_path).spacing is None


def test_rg1_jpeg2000_decodes_to_the_same_pixels(rg1_path: Path) -> None:
    plain = load_image(rg1_path).pixels
    j2k = load_image(data_file("RG1_J2KR.dcm")).pixels
    np.testing.assert_array_equal(plain, j2k)


def test_rg1_lossy_jpeg2000_is_close(rg1_path: Path) -> None:
    plain = load_image(rg1_path).pixels
    lossy = load_image(data_file("RG1_J2KI.dcm")).pixels
    assert float(np.abs(plain - lossy).mean()) < 0.01


@pytest.mark.tools
@pytest.mark.parametrize(
    ("tool", "options", "syntax"),
    [
        ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57"),  # JPEG lossless, process 14 (SV 6)
        # JPEG lossless, first-order prediction (SV1)
        ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),
        ("dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
        ("dcmcrle", [], "1.2.840.10008.1.2.5"),  # RLE lossless
        ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99"),  # deflated explicit little endian
        ("dcmconv", ["+ti"], "1.2.840.10008.1.2"),  # implicit little endian
        ("dcmconv", ["+tb"], "1.2.840.10008.1.2.2"),  # explicit big endian (retired)
    ],
)
def test_lossless_transfer_syntaxes_decode_identically(
    rg1_path: Path, tmp_path: Path, tool: str, options: list[str], syntax: str
) -> None:
    out = tmp_path / "transcoded.dcm"
    run_tool(tool, *options, rg1_path, out)
    assert dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_image(out).pixels, load_image(rg1_path).pixels)


@pytest.mark.tools
def test_jpeg_baseline_decodes_close_to_the_original(tmp_path: Path) -> None:
    ds = make_dataset(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1)))
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    run_tool("dcmcjpeg", "+eb", "+q", "90", tmp_path / "plain.dcm", tmp_path / "baseline.dcm")
    assert (
        dcmread(tmp_path / "baseline.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    )
    plain = load_image(tmp_path / "plain.dcm").pixels
    baseline = load_image(tmp_path / "baseline.dcm").pixels
    assert float(np.abs(plain - baseline).mean()) < 0.01


# --- broken and unsupported real files ------------------------------------------------


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SC_rgb.dcm", ImageErrorReason.COLOUR),
        ("examples_palette.dcm", ImageErrorReason.COLOUR),
        ("GDCMJ2K_TextGBR.dcm", ImageErrorReason.COLOUR),
        ("emri_small.dcm", ImageErrorReason.MULTI_FRAME),
        ("liver.dcm", ImageErrorReason.MULTI_FRAME),
        ("MR_truncated.dcm", ImageErrorReason.CORRUPT),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", ImageErrorReason.CORRUPT),
        ("JPEG-lossy.dcm", ImageErrorReason.UNDECODABLE),
        ("rtplan.dcm", ImageErrorReason.NO_PIXEL_DATA),
        ("test-SR.dcm", ImageErrorReason.NO_PIXEL_DATA),
        ("waveform_ecg.dcm", ImageErrorReason.NO_PIXEL_DATA),
        ("JPEGLSNearLossless_16.dcm", ImageErrorReason.GEOMETRY),
        ("rtplan.dump", ImageErrorReason.NOT_AN_IMAGE),
    ],
)
def test_broken_or_unsupported_real_files_raise_one_clear_error(
    name: str, reason: ImageErrorReason
) -> None:
    with pytest.raises(ImageError) as caught:
        load_image(data_file(name))
    assert caught.value.reason == reason
    message = str(caught.value)
    assert "\n" not in message
    assert name in message and f"[{reason}]" in message


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncation_is_detected_per_thread_when_reading_concurrently(rg1_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    truncated = data_file("emri_small_jpeg_2k_lossless_too_short.dcm")
    good = data_file("MR_small_RLE.dcm")

    def outcome(path: Path) -> str:
        try:
            load_image(path)
            return "ok"
        except ImageError as exc:
            return str(exc.reason)

    paths = [truncated, good] * 16
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(outcome, paths))
    assert results == ["corrupt", "ok"] * 16


def test_transfer_syntax_without_any_decoder_is_undecodable() -> None:
    ds = make_dataset(np.zeros((64, 64), np.uint16), bits=12)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(ImageError, match="no decoder exists for MPEG2") as caught:
        read_dicom(ds)
    assert caught.value.reason == ImageErrorReason.UNDECODABLE


def test_absurd_dimensions_are_refused_before_decoding() -> None:
    ds = make_dataset(np.zeros((64, 64), np.uint16), bits=12)
    ds.Rows = MAX_SIDE + 1  # the pixel data no longer matches: decoding must not be attempted
    with pytest.raises(ImageError, match=f"{MAX_SIDE + 1} x 64") as caught:
        read_dicom(ds)
    assert caught.value.reason == ImageErrorReason.GEOMETRY


@pytest.mark.parametrize("content", [b"", b"hello", bytes(range(256)) * 20])
def test_non_dicom_bytes_in_a_dcm_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert caught.value.reason in (ImageErrorReason.NOT_AN_IMAGE, ImageErrorReason.CORRUPT)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "absent.dcm")
    assert caught.value.reason == ImageErrorReason.NOT_FOUND


def test_dicom_bytes_are_accepted(rg1_path: Path) -> None:
    image = read_dicom(rg1_path.read_bytes())
    assert image.source == "<bytes>" and image.pixels.shape == (1955, 1841)


# --- the pipeline on datasets with known answers ------------------------------------------


RAMP = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096


def test_rescale_then_linear_window_matches_ps3_3_formula() -> None:
    ds = make_dataset(
        RAMP, bits=12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=3001
    )
    values = RAMP * 2.0 - 1000
    expected = np.clip((values - (2000 - 0.5)) / (3001 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(read_dicom(ds).pixels, expected, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions(function: str) -> None:
    ds = make_dataset(
        RAMP, bits=12, WindowCenter=[1500, 100], WindowWidth=[1000, 10], VOILUTFunction=function
    )
    values = RAMP.astype(np.float64)
    if function == "LINEAR_EXACT":
        expected = np.clip((values - 1500) / 1000 + 0.5, 0, 1)
    else:
        expected = 1 / (1 + np.exp(-4 * (values - 1500) / 1000))
    np.testing.assert_allclose(read_dicom(ds).pixels, expected, atol=1e-6)


def test_voi_lut_sequence_is_preferred_over_the_window() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]  # declares 16 bits, holds 12-bit values (common)
    table = (4095 - np.arange(4096)).astype(np.uint16)  # an inverting LUT
    lut.LUTData = table.tolist()
    ds = make_dataset(
        RAMP, bits=12, WindowCenter=2048, WindowWidth=4096, VOILUTSequence=Sequence([lut])
    )
    np.testing.assert_allclose(read_dicom(ds).pixels, 1 - RAMP / 4095.0, atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    kwargs = dict(WindowCenter=2048, WindowWidth=4096)
    m2 = read_dicom(make_dataset(RAMP, bits=12, **kwargs)).pixels
    m1 = read_dicom(make_dataset(RAMP, bits=12, photometric="MONOCHROME1", **kwargs)).pixels
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)


def test_no_window_uses_robust_percentiles() -> None:
    pixels = read_dicom(make_dataset(RAMP, bits=12)).pixels
    low, high = np.percentile(RAMP, [0.5, 99.5])
    np.testing.assert_allclose(pixels, np.clip((RAMP - low) / (high - low), 0, 1), atol=1e-6)


@pytest.mark.parametrize(
    ("sign", "photometric", "inverted"),
    [
        (1, "MONOCHROME2", True),
        (-1, "MONOCHROME2", False),
        (-1, "MONOCHROME1", False),
        (1, "MONOCHROME1", True),
    ],
)
def test_for_processing_dx_follows_the_pixel_intensity_relationship_sign(
    sign: int, photometric: str, inverted: bool
) -> None:
    kwargs = dict(
        WindowCenter=2048,
        WindowWidth=4096,
        PresentationIntentType="FOR PROCESSING",
        PixelIntensityRelationshipSign=sign,
    )
    pixels = read_dicom(make_dataset(RAMP, bits=12, photometric=photometric, **kwargs)).pixels
    straight = np.clip((RAMP - 2047.5) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(pixels, 1 - straight if inverted else straight, atol=1e-6)


def test_for_presentation_follows_the_photometric_interpretation() -> None:
    kwargs = dict(
        WindowCenter=2048,
        WindowWidth=4096,
        PresentationIntentType="FOR PRESENTATION",
        PixelIntensityRelationshipSign=1,
    )
    pixels = read_dicom(make_dataset(RAMP, bits=12, **kwargs)).pixels
    np.testing.assert_allclose(pixels, np.clip((RAMP - 2047.5) / 4095 + 0.5, 0, 1), atol=1e-6)


def test_pixel_spacing_preference() -> None:
    ds = make_dataset(RAMP, bits=12, PixelSpacing=[0.2, 0.25], ImagerPixelSpacing=[0.3, 0.3])
    assert pixel_spacing(ds) == (0.2, 0.25)
    del ds.PixelSpacing
    assert pixel_spacing(ds) == (0.3, 0.3)


@pytest.mark.parametrize("case", ["rg1", "rg1_j2k", "phantom", "anisotropic", "monochrome1"])
def test_the_node_and_training_see_the_same_canvas(rg1_path: Path, case: str) -> None:
    """The node's ``prepare`` (a received data set, with an overlay-sized copy kept) and
    training's ``load_letterboxed`` (a file, with its boxes) both end in
    ``dp_transforms.io.model_canvas``: they give the same model canvas, value for value, so
    that a change to either side's square pixels, resize or letterbox fails here; and that
    canvas is the square-pixel image fitted whole into the model's square, centred."""
    from node_support import chest_dataset

    from dp_transforms.array import load_letterboxed
    from pacs_node.model.predictor import prepare

    ds = {
        "rg1": lambda: dcmread(rg1_path),
        "rg1_j2k": lambda: dcmread(data_file("RG1_J2KR.dcm")),
        "phantom": chest_dataset,
        "anisotropic": lambda: chest_dataset(PixelSpacing=[0.1, 0.2]),
        "monochrome1": lambda: chest_dataset(PhotometricInterpretation="MONOCHROME1"),
    }[case]()
    prepared, (training, _, letterbox) = prepare(ds, 224), load_letterboxed(ds, 224)
    node = prepared.canvas
    assert node.shape == training.shape == (1, 224, 224)
    assert isinstance(node, np.ndarray)  # the node's canvas is NumPy's: no PyTorch
    np.testing.assert_array_equal(node, training.numpy())
    # one letterbox: the square-pixel image's longer side fills the canvas, its aspect kept,
    # centred between bands of zeros
    geometry = prepared.geometry
    assert geometry == letterbox
    rows, columns = ds.Rows, ds.Columns * (2 if case == "anisotropic" else 1)
    (height, width), (top, left) = geometry.content_shape, geometry.offset
    assert max(height, width) == 224 and abs(height / width - rows / columns) < 0.01
    assert (top, left) == ((224 - height) // 2, (224 - width) // 2)
    band = np.ones((224, 224), bool)
    band[top : top + height, left : left + width] = False
    assert not node[0][band].any() and node[0][~band].any()
