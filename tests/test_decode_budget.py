"""One decode budget for every decode path, and a conversion that stays within it.

What a file declares (Rows x Columns x Bits Allocated, the codestream's own frame header,
the RLE segments' run headers, the length of native Pixel Data) is checked before any
decoder allocates, whichever decoder pydicom would pick; square-pixel resampling and the
conversion to float stay bounded too, and the node's batches are sized by memory. The
hostile files here are built by hand, as an adversary would.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from node_support import (
    chest_dataset,
    final_lines,
    send,
    send_files,
    start_node,
    wait_for,
    write_raw,
)
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from dp_transforms import (
    ChestImage,
    ImageError,
    ImageErrorReason,
    dicom_to_image,
    make_square_pixels,
)
from dp_transforms import dicom as dicom_module
from dp_transforms.dicom import pixel_spacing
from pacs_node.intake.work import WorkQueue
from pacs_node.model.predictor import prepare
from pacs_node.status import StoreStatus


def peak_mb(call: Callable[[], object]) -> tuple[object, float]:
    """What ``call`` returns (or raises, as the exception) and the peak of what it allocated, in MiB."""
    tracemalloc.start()
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        result = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return result, peak


def encapsulated(rows: int, columns: int, syntax: str, frame: bytes, bits: int = 16) -> Dataset:
    """A chest radiograph's header around one hand-made compressed frame."""
    ds = chest_dataset(rows=16, columns=16)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 12), min(bits, 12) - 1
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pydicom decoding plugin is asked to decode a compressed frame."""
    monkeypatch.setattr(
        DecodeRunner, "_decode_frame", lambda self, src: pytest.fail("a decoder was called")
    )


# --- RLE ------------------------------------------------------------------------------------------


def rle_frame(segments: list[bytes]) -> bytes:
    """An RLE Lossless frame (PS3.5 G.5): the 64-byte header of segment offsets, then the segments."""
    offsets, at = [], 64
    for segment in segments:
        offsets.append(at)
        at += len(segment)
    return struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments))) + b"".join(
        segments
    )


#: A replicate run (PS3.5 G.3.1): header byte 129 repeats the next byte 128 times; 64x per byte.
REPLICATE_128 = bytes([129, 7])


def test_an_rle_bomb_is_refused_from_its_run_headers_without_inflating_it() -> None:
    # 256 x 256 pixels of 16 bits: each segment must decode to 65,536 bytes. The first is
    # short (the compiled decoder gives up on it), the second inflates 2 MiB into 128 MiB.
    bomb = encapsulated(
        256, 256, RLELossless, rle_frame([REPLICATE_128 * 8, REPLICATE_128 * 2**20])
    )
    refused, peak = peak_mb(lambda: dicom_to_image(bomb))
    assert isinstance(refused, ImageError), refused
    assert refused.reason == ImageErrorReason.CORRUPT and "RLE segment" in str(refused)
    assert peak < 16, f"refusing an RLE bomb allocated {peak:.0f} MiB"


def test_a_compiled_decoder_that_panics_costs_the_image_not_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pyo3 turns a panic of a Rust decoder (pylibjpeg-rle) into PanicException, a BaseException.
    panic = type("PanicException", (BaseException,), {})
    monkeypatch.setattr(
        DecodeRunner,
        "_decode_frame",
        lambda self, src: (_ for _ in ()).throw(panic("index out of bounds")),
    )
    ds = chest_dataset(rows=64, columns=64)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    with pytest.raises(ImageError) as refused:
        dicom_to_image(ds)
    assert refused.value.reason == ImageErrorReason.UNDECODABLE and "index out of bounds" in str(
        refused.value
    )


def test_the_pure_python_rle_decoder_is_not_used_while_a_compiled_one_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pydicom.pixels.decoders.rle as pure_python

    monkeypatch.setattr(
        pure_python,
        "_rle_decode_frame",
        lambda *args: pytest.fail("the pure-Python RLE decoder ran"),
    )
    short = encapsulated(256, 256, RLELossless, rle_frame([REPLICATE_128 * 8, REPLICATE_128 * 512]))
    with pytest.raises(ImageError) as refused:
        dicom_to_image(short)
    assert refused.value.reason == ImageErrorReason.UNDECODABLE


def test_rle_images_within_their_declared_size_decode_as_before() -> None:
    ds = chest_dataset(rows=300, columns=280, seed=3)
    plain = dicom_to_image(ds).pixels
    ds.compress(RLELossless, encoding_plugin="pydicom")
    np.testing.assert_array_equal(dicom_to_image(ds).pixels, plain)


def test_the_node_records_an_rle_bomb_as_corrupt_and_carries_on(node, tmp_path: Path) -> None:
    bomb = encapsulated(
        256, 256, RLELossless, rle_frame([REPLICATE_128 * 8, REPLICATE_128 * 2**20])
    )
    small = chest_dataset(seed=4)
    assert send_files(node.port, [write_raw(bomb, tmp_path / "bomb.dcm")]) == [StoreStatus.SUCCESS]
    assert send(node.port, [small]) == [StoreStatus.SUCCESS]
    uids = (bomb.SOPInstanceUID, small.SOPInstanceUID)
    wait_for(
        lambda: len([x for x in final_lines(node) if x["sop_instance_uid"] in uids]) == 2,
        60,
        "both outcomes",
    )
    lines = {x["sop_instance_uid"]: x for x in final_lines(node)}
    assert (
        lines[bomb.SOPInstanceUID]["status"] == "skipped"
        and lines[bomb.SOPInstanceUID]["skip_reason"] == "corrupt"
    )
    assert lines[small.SOPInstanceUID]["status"] == "processed"


# --- JPEG 2000 ------------------------------------------------------------------------------------


def j2k_codestream(declared: int | None = None) -> bytes:
    """A real 64 x 64 lossless JPEG 2000 codestream; with ``declared``, its SIZ says ``declared`` pixels a side."""
    ds = chest_dataset(rows=64, columns=64, BitsStored=16, HighBit=15)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    # after the Basic Offset Table
    codestream = b"".join(list(generate_fragments(ds.PixelData))[1:])
    if declared is not None:
        # SIZ: marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz
        at = codestream.index(b"\xff\x51")
        size = struct.pack(">II", declared, declared)
        codestream = (
            codestream[: at + 6]
            + size
            + codestream[at + 14 : at + 22]
            + size
            + codestream[at + 30 :]
        )
    return codestream


def box(kind: bytes, payload: bytes) -> bytes:
    """A JP2 box (ISO/IEC 15444-1 I.4): length, type, contents."""
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def jp2(codestream: bytes, decoy: bytes = b"") -> bytes:
    """A JP2 file around ``codestream``; ``decoy`` goes in an XML box before it."""
    header = box(b"ihdr", struct.pack(">IIHBBBB", 64, 64, 1, 15, 7, 0, 0)) + box(
        b"colr", struct.pack(">BBBI", 1, 0, 0, 17)
    )
    return (
        box(b"jP  ", b"\r\n\x87\n")
        + box(b"ftyp", b"jp2 " + bytes(4) + b"jp2 ")
        + box(b"jp2h", header)
        + (box(b"xml ", decoy) if decoy else b"")
        + box(b"jp2c", codestream)
    )


def test_a_jp2_frame_is_judged_by_its_codestream_not_by_a_decoy_siz(no_decoding: None) -> None:
    # The first SOC + SIZ in the frame sits in an XML box and says 64 x 64, as Rows and
    # Columns do; the codestream the decoder reads declares 12,000 x 12,000 (144 Mpx).
    frame = jp2(j2k_codestream(declared=12000), decoy=j2k_codestream()[:60])
    with pytest.raises(ImageError) as refused:
        dicom_to_image(encapsulated(64, 64, JPEG2000Lossless, frame))
    assert refused.value.reason == ImageErrorReason.GEOMETRY and "12000" in str(refused.value)


def test_a_jp2_wrapped_codestream_decodes_like_the_raw_one() -> None:
    raw = dicom_to_image(encapsulated(64, 64, JPEG2000Lossless, j2k_codestream())).pixels
    wrapped = dicom_to_image(
        encapsulated(64, 64, JPEG2000Lossless, jp2(j2k_codestream(), decoy=b"<not a codestream/>"))
    ).pixels
    np.testing.assert_array_equal(wrapped, raw)


def test_a_jpeg_2000_frame_must_start_with_its_codestream(no_decoding: None) -> None:
    with pytest.raises(ImageError) as refused:
        dicom_to_image(encapsulated(64, 64, JPEG2000Lossless, b"\x00" * 16 + j2k_codestream()))
    assert refused.value.reason == ImageErrorReason.CORRUPT and "SOC" in str(refused.value)


# --- JPEG -----------------------------------------------------------------------------------------


def jpeg_frame(
    rows: int = 64, columns: int = 64, padding: int = 0, components: int | None = None
) -> bytes:
    """A baseline JPEG of 64 x 64 gray pixels (Pillow) whose SOF declares ``rows`` x ``columns``,
    after ``padding`` APP1 segments of 64 KiB each."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8), "L").save(
        out, "JPEG", quality=90
    )
    data = out.getvalue()
    at = data.index(b"\xff\xc0")
    data = data[: at + 5] + struct.pack(">HH", rows, columns) + data[at + 9 :]
    if components is not None:
        data = data[: at + 9] + bytes([components]) + data[at + 10 :]
    app = (b"\xff\xe1" + struct.pack(">H", 65535) + bytes(65533)) * padding
    return data[:2] + app + data[2:]


def test_a_jpeg_frame_header_pushed_beyond_the_searched_head_is_refused(no_decoding: None) -> None:
    frame = jpeg_frame(rows=16384, columns=16384, padding=2)
    with pytest.raises(ImageError) as refused:
        dicom_to_image(encapsulated(64, 64, JPEGBaseline8Bit, frame, bits=8))
    assert refused.value.reason == ImageErrorReason.CORRUPT


def test_a_jpeg_frame_with_more_components_than_one_gray_sample_is_refused(
    no_decoding: None,
) -> None:
    with pytest.raises(ImageError) as refused:
        dicom_to_image(encapsulated(64, 64, JPEGBaseline8Bit, jpeg_frame(components=3), bits=8))
    assert refused.value.reason == ImageErrorReason.CORRUPT and "3 components" in str(refused.value)


def test_a_plain_jpeg_frame_still_decodes() -> None:
    image = dicom_to_image(encapsulated(64, 64, JPEGBaseline8Bit, jpeg_frame(), bits=8))
    assert image.shape == (64, 64)


# --- native ---------------------------------------------------------------------------------------


def test_native_pixel_data_longer_than_the_budget_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = chest_dataset(rows=64, columns=64)
    ds.PixelData = ds.PixelData * 64  # 64 frames' worth of bytes behind a one-frame header
    path = write_raw(ds, tmp_path / "long.dcm")
    monkeypatch.setattr(dicom_module, "MAX_BYTES", 64 * 64 * 2 * 8)
    deferred = dcmread(path, defer_size=1024)
    with pytest.raises(ImageError) as refused:
        dicom_to_image(deferred)
    assert refused.value.reason == ImageErrorReason.GEOMETRY
    assert deferred.get_item("PixelData", keep_deferred=True).value is None, (
        "the pixel data was read"
    )


def test_decoding_leaves_the_data_set_without_its_pixel_bytes(tmp_path: Path) -> None:
    # The node keeps every data set of a batch until its results are written.
    path = write_raw(chest_dataset(rows=512, columns=512), tmp_path / "image.dcm")
    deferred = dcmread(path, defer_size=1024)
    dicom_to_image(deferred)
    assert deferred.get_item("PixelData", keep_deferred=True).value is None


# --- pixel spacing and square pixels ------------------------------------------------------------


@pytest.mark.parametrize("spacing", [[1, 0.001], [9999, 0.0001]])
def test_an_absurd_spacing_ratio_costs_the_attribute_not_the_image(
    spacing: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    ds = chest_dataset(rows=256, columns=256, PixelSpacing=spacing)
    prepared, peak = peak_mb(lambda: prepare(ds, 64, "image"))
    assert not isinstance(prepared, Exception), prepared
    assert prepared.source.spacing is None and prepared.source.shape == (256, 256)
    assert peak < 32, f"an image of 256 x 256 pixels allocated {peak:.0f} MiB"
    assert "Pixel Spacing" in caplog.text and str(spacing[1]) not in caplog.text


def test_an_absurd_spacing_ratio_falls_back_to_the_imager_pixel_spacing() -> None:
    ds = chest_dataset(
        rows=256, columns=256, PixelSpacing=[1, 0.001], ImagerPixelSpacing=[0.2, 0.2]
    )
    assert pixel_spacing(ds) == (0.2, 0.2)


def test_square_pixel_resampling_never_exceeds_the_pixel_budget() -> None:
    image = ChestImage(np.zeros((1000, 1000), np.float32), spacing=(0.4, 0.1))
    square = make_square_pixels(image, max_pixels=2_000_000)
    assert square.pixels.size <= 2_000_000
    rows, columns = square.shape
    assert square.spacing[0] == square.spacing[1]
    assert rows * square.spacing[0] == pytest.approx(400, rel=0.01) and columns * square.spacing[
        1
    ] == pytest.approx(100, rel=0.01)


def test_square_pixel_resampling_of_an_absurd_ratio_leaves_the_image_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = ChestImage(np.zeros((256, 256), np.float32), spacing=(1.0, 0.001), source="t.mha")
    square = make_square_pixels(image)
    assert square.shape == (256, 256) and square.spacing is None
    assert "spacing" in caplog.text


# --- one large, legitimate image ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8192 x 8192 16-bit radiograph (128 MiB of pixels; every guard accepts it), on disk."""
    side = 8192
    ramp = (np.arange(side, dtype=np.uint16) % 4096)[None, :]
    ds = chest_dataset(rows=16, columns=16, PixelSpacing=[0.05, 0.05])
    ds.Rows = ds.Columns = side
    ds.PixelData = np.broadcast_to(ramp, (side, side)).tobytes()
    path = tmp_path_factory.mktemp("large") / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_an_8192_pixel_square_image_converts_within_a_small_multiple_of_its_stored_size(
    large_file: Path,
) -> None:
    ds = dcmread(large_file, defer_size="256 KB")  # as the node reads
    started = time.perf_counter()
    image, peak = peak_mb(lambda: dicom_to_image(ds))
    assert not isinstance(image, Exception), image
    assert time.perf_counter() - started < 20
    assert peak < 400, f"converting 128 MiB of stored values allocated {peak:.0f} MiB at its peak"
    assert image.pixels.dtype == np.float32 and image.pixels.size <= dicom_module.WORKING_PIXELS
    assert image.original_shape == (8192, 8192)
    assert image.spacing == pytest.approx(
        (0.05 * 8192 / image.shape[0], 0.05 * 8192 / image.shape[1])
    )
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0


def test_the_node_keeps_only_an_overlay_sized_copy_of_a_large_image(large_file: Path) -> None:
    ds = dcmread(large_file, defer_size="256 KB")
    prepared, peak = peak_mb(lambda: prepare(ds, 64, "image", max_side=2048))
    assert not isinstance(prepared, Exception), prepared
    assert peak < 400, f"preparing an 8192 x 8192 image allocated {peak:.0f} MiB at its peak"
    held = (prepared.source.pixels.nbytes + prepared.canvas.nbytes) / 2**20
    assert held <= 16.1, f"a prepared 8192 x 8192 image holds {held:.0f} MiB"
    assert max(prepared.source.shape) == 2048 and prepared.source_shape == (8192, 8192)
    assert prepared.source.spacing == pytest.approx((0.2, 0.2))


# --- the worker's batches -------------------------------------------------------------------------------


def test_the_work_queue_fills_a_batch_by_memory_not_by_count() -> None:
    weights = {"a": 40, "b": 40, "c": 40, "heavy": 150, "d": 10}
    queue = WorkQueue(weigh=lambda path: weights[path.name])
    for name in weights:
        queue.put(Path(name))
    taken = [[p.name for p in queue.take(8, 0.1, max_bytes=100)] for _ in range(3)]
    assert taken == [["a", "b"], ["c"], ["heavy"]]  # an image heavier than the budget goes alone
    assert [p.name for p in queue.take(8, 0.1, max_bytes=100)] == ["d"]


class Recording:
    """The real predictor, recording each batch (the size of its images) and holding the first one."""

    def __init__(self, inner) -> None:
        self.inner, self.contract = inner, inner.contract
        self.batches: list[list[tuple[int, int]]] = []
        self.gate, self.entered = threading.Event(), threading.Event()

    def predict(self, prepared):
        self.batches.append([p.source.shape for p in prepared])
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.predict(prepared)


def test_a_batch_of_large_images_is_sized_by_memory(tmp_path: Path, predictor) -> None:
    recording = Recording(predictor)
    # Each 2048 x 2048 image keeps a 1024 x 1024 float32 copy for its overlay (4 MiB): two fit in 10 MiB.
    node = start_node(tmp_path, recording, batch_size=8, batch_memory_mb=10, overlay_max_side=1024)
    try:
        assert send(node.port, [chest_dataset(rows=320, columns=288, seed=20)]) == [
            StoreStatus.SUCCESS
        ]
        wait_for(recording.entered.is_set, 60, "the first batch")
        large = [chest_dataset(rows=2048, columns=2048, seed=21 + i) for i in range(4)]
        assert send(node.port, large) == [StoreStatus.SUCCESS] * 4
        recording.gate.set()
        wait_for(lambda: len(final_lines(node, "processed")) == 5, 120, "every result")
    finally:
        node.stop()
    later = recording.batches[1:]
    assert sum(len(batch) for batch in later) == 4
    assert all(len(batch) <= 2 for batch in later), recording.batches
    assert all(max(shape) <= 1024 for batch in later for shape in batch), recording.batches
