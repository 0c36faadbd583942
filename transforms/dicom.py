"""DICOM to pixels: the one conversion used by training, evaluation and the node.

PS3.3 C.11 defines the grayscale pipeline applied here, in order:

1. Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence), C.11.1;
2. VOI LUT Sequence, else the first Window Center / Width with its VOI LUT Function
   (LINEAR, LINEAR_EXACT, SIGMOID), C.11.2; with neither, a robust automatic window
   (0.5th to 99.5th percentile), as viewers do;
3. polarity: MONOCHROME1 is inverted so that larger always means brighter (more
   attenuation). For DX images "FOR PROCESSING", Pixel Intensity Relationship Sign
   (C.8.11.3.1.2) decides instead, because such images are defined by their relation to
   the X-ray beam rather than by their display.

The result is a float32 image in [0, 1] plus the physical pixel spacing, which the outputs
of the node need for their geometry. Anything that cannot be converted raises
:class:`~dp_transforms.errors.ImageError` with a reason code and a one-line message.

Reading is tolerant (:mod:`dp_transforms.header`): the pipeline works on a copy of the
image pixel module in which every value was checked. A window, rescale or VOI function
that is not usable is dropped (with a warning that names the attribute, never its value),
so a broken window costs an automatic window, not the image. Attributes without which
the pixels cannot be read (Rows, Columns, Bits Allocated ...) make the image unusable.
Before a compressed frame is decoded, the size its own codestream declares is checked:
a decoder is never asked for more pixels than :data:`MAX_PIXELS`, whatever Rows and
Columns say.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from os import PathLike
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import header
from .codestream import declared_shape
from .errors import ImageError, ImageErrorReason

logger = logging.getLogger(__name__)

#: Smallest and largest accepted side, and largest pixel count. A chest radiograph is
#: 1,000 to 4,300 pixels a side; anything outside these bounds is a wrong or hostile file.
MIN_SIDE = 16
MAX_SIDE = 16384
MAX_PIXELS = 64 * 2**20

#: Percentiles of the automatic window used when a file carries no VOI information.
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Photometric interpretations a message may name (any other value is not repeated).
KNOWN_PHOTOMETRIC = (*MONOCHROME, "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK")
#: How much of the start of a compressed frame is searched for the codestream's own header.
CODESTREAM_HEAD = 65536


@dataclass(frozen=True)
class ChestImage:
    """A single-channel radiograph ready for the model.

    Attributes:
        pixels: float32 array (rows, columns) in [0, 1]; larger is brighter, i.e. more
            attenuating (bone and soft tissue bright, lungs and air dark).
        spacing: (row, column) pixel spacing in mm, or None when the file does not say.
        source: where the image came from, for messages.
    """

    pixels: np.ndarray
    spacing: tuple[float, float] | None = None
    source: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


def read_dicom(source: str | PathLike | bytes | BinaryIO | Dataset) -> ChestImage:
    """Read a DICOM file, bytes or dataset and convert it with :func:`dicom_to_image`.

    Reading is tolerant: a file without the 128-byte preamble and file meta information
    (old or hand-made files) is still read if it parses as a dataset with an image.

    Raises:
        ImageError: the input is not DICOM, is truncated, or holds no usable image.
    """
    if isinstance(source, Dataset):
        return dicom_to_image(source)
    if isinstance(source, (bytes, bytearray)):
        name, source = "<bytes>", BytesIO(source)
    elif isinstance(source, (str, PathLike)):
        name = str(source)
    else:
        name = str(getattr(source, "name", "<stream>"))
    return dicom_to_image(_parse(source, name), source=name)


class _ReadWarnings(logging.Handler):
    """Collects the warnings pydicom logs while the current thread reads a file.

    pydicom reports a file that ends too early only as a warning. ``warnings.catch_warnings``
    would catch it but changes process-wide state, which races when the node reads in
    several threads; log records are handled in the thread that logged them, so a
    thread-local list holds exactly this read's warnings.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        messages = getattr(self._local, "messages", None)
        if messages is not None:
            messages.append(record.getMessage())

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        self._local.messages = messages = []
        try:
            yield messages
        finally:
            self._local.messages = None


_READ_WARNINGS = _ReadWarnings()
logging.getLogger("pydicom").addHandler(_READ_WARNINGS)


def _parse(source: str | PathLike | BinaryIO, name: str) -> Dataset:
    with _READ_WARNINGS.capture() as messages:
        try:
            ds = _dcmread_tolerant(source)
        except FileNotFoundError as exc:
            raise ImageError(ImageErrorReason.NOT_FOUND, "no such file", name) from exc
        except InvalidDicomError as exc:
            raise ImageError(ImageErrorReason.NOT_AN_IMAGE, "not a DICOM file", name) from exc
        except Exception as exc:  # pydicom raises many types for broken streams
            raise ImageError(ImageErrorReason.CORRUPT, f"unreadable DICOM ({_one_line(exc)})", name) from exc
    truncated = [m for m in messages if "end of file" in m.lower()]
    if truncated:
        raise ImageError(ImageErrorReason.CORRUPT, f"file is truncated ({_one_line(truncated[0])})", name)
    return ds


def _dcmread_tolerant(source: str | PathLike | BinaryIO) -> Dataset:
    try:
        return dcmread(source)
    except InvalidDicomError:
        if hasattr(source, "seek"):
            source.seek(0)  # type: ignore[union-attr]
        ds = dcmread(source, force=True)
        # force=True parses anything; a real dataset has an image or at least a SOP class.
        if "PixelData" not in ds and "SOPClassUID" not in ds:
            raise
        return ds


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def dicom_to_image(ds: Dataset, source: str = "") -> ChestImage:
    """Convert a DICOM dataset to a :class:`ChestImage` (modality LUT, VOI, polarity).

    Args:
        ds: a dataset with a single-frame grayscale image.
        source: a name for messages; defaults to the SOP Instance UID.

    Raises:
        ImageError: no pixel data, colour, several frames, absurd geometry, a transfer
            syntax no installed decoder handles, or pixel data that fails to decode.
    """
    source = source or str(header.text(ds, "SOPInstanceUID") or "dataset")
    pixel = pixel_module(ds, source)
    stored = decode_pixels(pixel, source)
    values = _modality_values(stored, pixel, source)
    pixels = apply_voi_window(values, pixel)
    if not _larger_is_brighter(pixel):
        pixels = 1.0 - pixels
    return ChestImage(np.clip(pixels, 0.0, 1.0).astype(np.float32), pixel_spacing(ds), source)


#: Attributes without which stored pixel values cannot be read.
REQUIRED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def pixel_module(ds: Dataset, source: str) -> Dataset:
    """A checked copy of what decoding and display need; unusable optional values left out.

    Raises:
        ImageError: the image cannot be a single grayscale radiograph, or an attribute
            needed to read its pixels is missing or unusable.
    """
    check_single_grayscale_frame(ds, source)
    out = Dataset()
    out.file_meta = _file_meta(ds)
    for keyword in REQUIRED:
        value = header.integer(ds, keyword)
        if value is None:
            raise ImageError(ImageErrorReason.CORRUPT, f"{keyword} is missing or not a whole number", source)
        setattr(out, keyword, value)
    if out.BitsAllocated not in (8, 16, 32) or not 1 <= out.BitsStored <= out.BitsAllocated or out.PixelRepresentation not in (0, 1):
        raise ImageError(ImageErrorReason.CORRUPT, f"{out.BitsStored} bits stored in {out.BitsAllocated} allocated, representation {out.PixelRepresentation}", source)
    out.HighBit = out.BitsStored - 1  # the only value DICOM allows for a grayscale image
    out.SamplesPerPixel, out.PhotometricInterpretation = 1, header.text(ds, "PhotometricInterpretation")
    out.add(ds["PixelData"])
    _copy_optional(ds, out, source)
    return out


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """The dataset's file meta, or one that states the encoding it was read with."""
    meta = FileMetaDataset()
    syntax = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        implicit, little = getattr(ds, "original_encoding", (False, True))
        syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    meta.TransferSyntaxUID = UID(str(syntax).strip(" \x00"))
    return meta


def _copy_optional(ds: Dataset, out: Dataset, source: str) -> None:
    """Rescale, window, VOI and polarity attributes, each only when usable."""
    slope, intercept = header.number(ds, "RescaleSlope"), header.number(ds, "RescaleIntercept")
    if slope is not None and intercept is not None and slope != 0:
        out.RescaleSlope, out.RescaleIntercept = slope, intercept
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        logger.warning("%s: Rescale Slope / Intercept unusable; stored values used as they are", source)
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in out:
        out.add(ds["ModalityLUTSequence"])
    centers, widths = header.numbers(ds, "WindowCenter"), header.numbers(ds, "WindowWidth")
    if centers and widths:
        out.WindowCenter, out.WindowWidth = centers[0], widths[0]
        function = header.text(ds, "VOILUTFunction")
        out.VOILUTFunction = function if function in VOI_FUNCTIONS else "LINEAR"
    elif "WindowCenter" in ds or "WindowWidth" in ds:
        logger.warning("%s: Window Center / Width unusable; using an automatic window", source)
    if "VOILUTSequence" in ds:
        out.add(ds["VOILUTSequence"])
    sign = header.integer(ds, "PixelIntensityRelationshipSign")
    if sign in (1, -1):
        out.PixelIntensityRelationshipSign = sign
    out.PresentationIntentType = header.text(ds, "PresentationIntentType")


def _modality_values(stored: np.ndarray, ds: Dataset, source: str) -> np.ndarray:
    """The Modality LUT applied; a Modality LUT Sequence that cannot be applied is ignored."""
    try:
        return apply_modality_lut(stored, ds).astype(np.float64, copy=False)
    except Exception:  # noqa: BLE001 - a malformed LUT costs the LUT, not the image
        logger.warning("%s: Modality LUT Sequence unusable; stored values used as they are", source)
        return stored.astype(np.float64)


def check_single_grayscale_frame(ds: Dataset, source: str) -> None:
    """Refuse, before decoding anything, what cannot be a single grayscale radiograph."""
    if "PixelData" not in ds:
        kind = "float" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no"
        raise ImageError(ImageErrorReason.NO_PIXEL_DATA, f"{kind} pixel data (7FE0,0010)", source)
    photometric = header.text(ds, "PhotometricInterpretation")
    samples = header.integer(ds, "SamplesPerPixel") or 1
    if samples != 1 or photometric not in MONOCHROME:
        raise ImageError(
            ImageErrorReason.COLOUR,
            f"Photometric Interpretation {photometric if photometric in KNOWN_PHOTOMETRIC else '(not a known value)'} with {samples} sample(s) "
            "per pixel; a radiograph is MONOCHROME1 or MONOCHROME2",
            source,
        )
    frames = header.integer(ds, "NumberOfFrames") or 1
    if frames != 1:
        raise ImageError(ImageErrorReason.MULTI_FRAME, f"{frames} frames; expected one", source)
    check_geometry(header.integer(ds, "Rows") or 0, header.integer(ds, "Columns") or 0, source)


def check_geometry(rows: int, columns: int, source: str = "") -> None:
    """Refuse sizes no radiograph has (and that would exhaust memory)."""
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= columns <= MAX_SIDE):
        raise ImageError(
            ImageErrorReason.GEOMETRY,
            f"image of {rows} x {columns} pixels; each side must be {MIN_SIDE} to {MAX_SIDE}",
            source,
        )
    if rows * columns > MAX_PIXELS:
        raise ImageError(
            ImageErrorReason.GEOMETRY,
            f"image of {rows} x {columns} pixels exceeds {MAX_PIXELS} pixels",
            source,
        )


def check_codestream(ds: Dataset, source: str) -> None:
    """Refuse a compressed frame whose own header declares too many pixels, or other ones than Rows and Columns.

    Decoders allocate what the codestream declares, not what Rows and Columns say: a
    586-byte JPEG 2000 can declare 16384 x 16384 pixels.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        head = b"".join(_first_fragments(ds.PixelData))
    except Exception as exc:
        raise ImageError(ImageErrorReason.CORRUPT, f"compressed pixel data not encapsulated ({_one_line(exc)})", source) from exc
    shape = declared_shape(head, syntax)
    if shape is None:
        return  # RLE, or a codestream whose header says nothing of its size: Rows and Columns bound it
    rows, columns = shape
    if rows == 0 or columns == 0:
        raise ImageError(ImageErrorReason.UNSUPPORTED, "codestream does not declare its size in its header", source)
    check_geometry(rows, columns, f"{source} (codestream header)" if source else "codestream header")
    if (rows, columns) != (ds.Rows, ds.Columns):
        raise ImageError(ImageErrorReason.CORRUPT, f"codestream declares {rows} x {columns} pixels, the header {ds.Rows} x {ds.Columns}", source)


def _first_fragments(pixel_data: bytes) -> Iterator[bytes]:
    """The start of the first frame: fragments after the Basic Offset Table, up to CODESTREAM_HEAD bytes."""
    taken = 0
    for index, fragment in enumerate(generate_fragments(pixel_data)):
        if index == 0:
            continue  # the Basic Offset Table
        yield fragment[: CODESTREAM_HEAD - taken]
        taken += len(fragment)
        if taken >= CODESTREAM_HEAD:
            return


def decode_pixels(ds: Dataset, source: str) -> np.ndarray:
    """Decode the stored values with pydicom's pixel handlers, mapping every failure."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise ImageError(
                ImageErrorReason.UNDECODABLE, f"no decoder exists for {syntax.name}", source
            ) from exc
        if not decoder.is_available:
            raise ImageError(
                ImageErrorReason.UNDECODABLE,
                f"no installed plugin decodes {syntax.name} (needs one of: "
                f"{', '.join(sorted(decoder.missing_dependencies)) or 'a decoder plugin'})",
                source,
            )
        check_codestream(ds, source)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise ValueError, RuntimeError, struct errors ...
        if syntax is not None and syntax.is_compressed:
            reason, what = ImageErrorReason.UNDECODABLE, syntax.name
        else:
            reason, what = ImageErrorReason.CORRUPT, syntax.name if syntax else "native"
        raise ImageError(
            reason, f"pixel data could not be decoded ({what}): {_one_line(exc)}", source
        ) from exc
    if arr.ndim != 2:
        raise ImageError(
            ImageErrorReason.UNSUPPORTED, f"decoded pixel array has shape {arr.shape}", source
        )
    return arr


def apply_voi_window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map modality values to [0, 1] by the VOI LUT, the window, or an automatic window."""
    if ds.get("VOILUTSequence"):
        try:
            return _apply_voi_lut_sequence(values, ds)
        except Exception:  # noqa: BLE001 - a malformed LUT costs the LUT, not the image
            logger.warning("%s: VOI LUT Sequence unusable; using the window or an automatic one", ds.get("SOPInstanceUID", "dataset"))
    window = _first_window(ds)
    if window is not None:
        center, width = window
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        return window_to_unit(values, center, width, function)
    return auto_window(values)


def auto_window(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between robust percentiles, for images that carry no window."""
    low, high = np.percentile(values, AUTO_WINDOW_PERCENTILES)
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def window_to_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing, with output range [0, 1] instead of [ymin, ymax]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR with width 1 is a threshold at the center (C.11.2.1.2.1)
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = header.number(ds, "WindowCenter"), header.number(ds, "WindowWidth")
    if center is None or width is None:
        return None
    if width <= 0:
        logger.warning("ignoring a Window Width of %g (must be > 0); using an automatic window", width)
        return None
    return center, width


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    entries, first_mapped = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    # The range of the LUT's own entries, not its nominal bit depth: many files declare
    # 16 bits for 12-bit data.
    table = apply_voi(np.arange(first_mapped, first_mapped + entries, dtype=np.int64), ds)
    low, high = float(table.min()), float(table.max())
    mapped = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
    if high <= low:
        return np.zeros_like(mapped)
    return (mapped - low) / (high - low)


def _larger_is_brighter(ds: Dataset) -> bool:
    photometric_says = header.text(ds, "PhotometricInterpretation") == "MONOCHROME2"
    sign = header.integer(ds, "PixelIntensityRelationshipSign")
    if sign in (1, -1) and header.text(ds, "PresentationIntentType") == "FOR PROCESSING":
        # -1: higher values mean less beam intensity, i.e. more attenuation: brighter.
        sign_says = sign == -1
        if sign_says != photometric_says:
            logger.warning("Pixel Intensity Relationship Sign %+d disagrees with the photometric interpretation; following the sign", sign)
        return sign_says
    return photometric_says


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing, else None.

    Zero or negative values, which real files carry, count as absent.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        found = header.numbers(ds, keyword)
        if found is not None and len(found) == 2 and all(0 < v < 1e4 for v in found):
            return found[0], found[1]
    return None
