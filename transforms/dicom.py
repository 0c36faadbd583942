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
One decode budget (:data:`MAX_PIXELS`, :data:`MAX_BYTES`) holds for every decode path,
fallback decoders included, and is checked before anything is allocated: on what the
header declares (Rows x Columns x Bits Allocated), on what the frame itself declares (the
JPEG or JPEG-LS frame header, the JPEG 2000 SIZ the decoder will read, the decoded length
of each RLE segment counted from its run headers; see :mod:`dp_transforms.codestream`), on
the length of native Pixel Data, and finally on the decoded array. Conversion then works in
float32 (exact for stored values of up to 24 bits), in place, and an image larger than
:data:`WORKING_PIXELS` is first reduced by block means of its stored values: no model input
or overlay needs more, and a legitimate 8192 x 8192 image then costs about twice its stored
size at the peak instead of sixteen times.
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
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_deferred_data_element
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import header
from .codestream import CodestreamError, Declared, check_rle, declared_frame, kind
from .errors import ImageError, ImageErrorReason

logger = logging.getLogger(__name__)

#: Smallest and largest accepted side, and largest pixel count. A chest radiograph is
#: 1,000 to 4,300 pixels a side; anything outside these bounds is a wrong or hostile file.
MIN_SIDE = 16
MAX_SIDE = 16384
MAX_PIXELS = 64 * 2**20
#: The decode budget in bytes: stored values of up to 16 bits at MAX_PIXELS (an image of
#: 32 bits allocated may have half as many pixels). Native Pixel Data longer than this is
#: not read at all.
MAX_BYTES = 2 * MAX_PIXELS
#: Images with more pixels are reduced (block means of the stored values) before conversion
#: to float: a 4,300 x 4,300 radiograph, the largest detectors', is not; 8192 x 8192 is.
WORKING_PIXELS = 20 * 2**20
#: Stored values of up to this many bits are exact in float32 (24-bit significand).
FLOAT32_EXACT_BITS = 24
#: A pixel spacing whose rows and columns differ by more than this ratio is no radiograph's
#: (non-square CR pixels differ by a few per cent); it is treated as unknown.
MAX_SPACING_RATIO = 4.0
#: Decoding plugins in order of preference: compiled ones first. pydicom otherwise tries
#: every installed plugin in turn, and behind a compiled RLE decoder that refuses a frame
#: comes its pure-Python one, which inflates a whole segment before checking its length.
PLUGIN_PREFERENCE = ("pylibjpeg", "gdcm", "pyjpegls", "pillow", "pydicom")

#: Percentiles of the automatic window used when a file carries no VOI information.
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Photometric interpretations a message may name (any other value is not repeated).
KNOWN_PHOTOMETRIC = (
    *MONOCHROME,
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
    "HSV",
    "ARGB",
    "CMYK",
)
#: How much of the start of a compressed frame is searched for the codestream's own header.
CODESTREAM_HEAD = 65536


@dataclass(frozen=True)
class ChestImage:
    """A single-channel radiograph ready for the model.

    Attributes:
        pixels: float32 array (rows, columns) in [0, 1]; larger is brighter, i.e. more
            attenuating (bone and soft tissue bright, lungs and air dark).
        spacing: (row, column) spacing of ``pixels`` in mm, or None when the file does not say.
        source: where the image came from, for messages.
        original_shape: (rows, columns) of the stored image when ``pixels`` has another shape
            (a very large image reduced, pixels resampled square); None when it is the same.
            Coordinates on the stored image (annotations, results) scale by the ratio.
    """

    pixels: np.ndarray
    spacing: tuple[float, float] | None = None
    source: str = ""
    original_shape: tuple[int, int] | None = None

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
            raise ImageError(
                ImageErrorReason.CORRUPT, f"unreadable DICOM ({_one_line(exc)})", name
            ) from exc
    truncated = [m for m in messages if "end of file" in m.lower()]
    if truncated:
        raise ImageError(
            ImageErrorReason.CORRUPT, f"file is truncated ({_one_line(truncated[0])})", name
        )
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


def dicom_to_image(
    ds: Dataset, source: str = "", working_pixels: int = WORKING_PIXELS
) -> ChestImage:
    """Convert a DICOM dataset to a :class:`ChestImage` (modality LUT, VOI, polarity).

    Pixel Data that ``ds`` has not read yet (``dcmread(..., defer_size=...)``) is read for
    decoding and not kept in ``ds``.

    Args:
        ds: a dataset with a single-frame grayscale image.
        source: a name for messages; defaults to the SOP Instance UID.
        working_pixels: an image with more pixels is reduced by the smallest whole factor
            that brings it within (each pixel the mean of a block of stored values; the
            spacing grows by the factor, ``original_shape`` keeps the stored size).

    Raises:
        ImageError: no pixel data, colour, several frames, absurd geometry, a transfer
            syntax no installed decoder handles, or pixel data that fails to decode.
    """
    source = source or str(header.text(ds, "SOPInstanceUID") or "dataset")
    pixel = pixel_module(ds, source)
    stored = decode_pixels(pixel, source)
    del pixel.PixelData  # the encoded bytes are not needed past decoding
    shape, factor = stored.shape, reduction_factor(*stored.shape, working_pixels)
    values = _modality_values(stored, pixel, source, factor)
    del stored
    pixels = apply_voi_window(values, pixel, in_place=True)
    if not _larger_is_brighter(pixel):
        np.subtract(1.0, pixels, out=pixels)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    spacing = pixel_spacing(ds)
    if spacing is not None and factor > 1:
        spacing = (spacing[0] * factor, spacing[1] * factor)
    return ChestImage(
        pixels.astype(np.float32, copy=False), spacing, source, shape if factor > 1 else None
    )


def reduction_factor(rows: int, columns: int, working_pixels: int) -> int:
    """The smallest whole factor whose blocks bring ``rows x columns`` within ``working_pixels``."""
    factor = 1
    while -(-rows // factor) * -(-columns // factor) > working_pixels:
        factor += 1
    return factor


#: Rows of blocks reduced at a time: a strip's float copy stays a few MB.
STRIP_BLOCKS = 64


def block_mean(values: np.ndarray, factor: int, dtype: type = np.float32) -> np.ndarray:
    """Mean of each ``factor x factor`` block of ``values`` (an edge block: of the pixels it
    holds), computed in ``dtype`` a strip at a time, so that no full-size float copy exists."""
    rows, columns = values.shape
    out = np.empty((-(-rows // factor), -(-columns // factor)), dtype)
    starts = np.arange(0, columns, factor)
    for top in range(0, out.shape[0], STRIP_BLOCKS):
        strip = values[top * factor : (top + STRIP_BLOCKS) * factor]
        sums = np.add.reduceat(strip, np.arange(0, len(strip), factor), axis=0, dtype=dtype)
        out[top : top + len(sums)] = np.add.reduceat(sums, starts, axis=1)
    out /= np.minimum(factor, rows - np.arange(0, rows, factor)).astype(dtype)[:, None]
    out /= np.minimum(factor, columns - starts).astype(dtype)[None, :]
    return out


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
            raise ImageError(
                ImageErrorReason.CORRUPT, f"{keyword} is missing or not a whole number", source
            )
        setattr(out, keyword, value)
    if (
        out.BitsAllocated not in (8, 16, 32)
        or not 1 <= out.BitsStored <= out.BitsAllocated
        or out.PixelRepresentation not in (0, 1)
    ):
        raise ImageError(
            ImageErrorReason.CORRUPT,
            f"{out.BitsStored} bits stored in {out.BitsAllocated} allocated, representation {out.PixelRepresentation}",
            source,
        )
    out.HighBit = out.BitsStored - 1  # the only value DICOM allows for a grayscale image
    check_budget(out.Rows, out.Columns, out.BitsAllocated, source)
    out.SamplesPerPixel, out.PhotometricInterpretation = (
        1,
        header.text(ds, "PhotometricInterpretation"),
    )
    out.add(_pixel_data(ds, out, source))
    _copy_optional(ds, out, source)
    return out


PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF


def _pixel_data(ds: Dataset, out: Dataset, source: str) -> DataElement:
    """Pixel Data as an element of its own, read from the file when ``ds`` deferred it
    (and then not cached in ``ds``); native Pixel Data longer than the budget is never read."""
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    raw = isinstance(element, RawDataElement)
    syntax = out.file_meta.TransferSyntaxUID
    compressed = syntax.is_transfer_syntax and syntax.is_compressed
    length = (
        (0 if element.length == UNDEFINED_LENGTH else element.length)
        if raw
        else len(element.value or b"")
    )
    if not compressed and length > MAX_BYTES:
        raise ImageError(
            ImageErrorReason.GEOMETRY,
            f"native pixel data of {length} bytes exceeds the decode budget of {MAX_BYTES} bytes",
            source,
        )
    if not raw:
        return element
    if element.value is None and element.length:
        try:
            element = read_deferred_data_element(
                ds.fileobj_type, _deferred_source(ds), ds.timestamp, element
            )
        except Exception as exc:  # a file gone or changed since it was read
            raise ImageError(
                ImageErrorReason.CORRUPT, f"pixel data could not be read ({_one_line(exc)})", source
            ) from exc
    vr = (
        element.VR
        if element.VR in ("OB", "OW")
        else ("OB" if compressed or out.BitsAllocated <= 8 else "OW")
    )
    return DataElement(
        PIXEL_DATA, vr, element.value, is_undefined_length=element.length == UNDEFINED_LENGTH
    )


def _deferred_source(ds: Dataset) -> object:
    """Where ``ds`` reads deferred values from, as pydicom's own ``Dataset.__getitem__`` chooses."""
    if ds.filename and ds.buffer is not None and not getattr(ds.buffer, "closed", False):
        return ds.buffer
    return ds.filename or ds.buffer


def check_budget(rows: int, columns: int, bits: int, source: str, what: str = "image") -> None:
    """Refuse ``rows x columns`` samples of ``bits`` bits beyond the decode budget (pixels and bytes)."""
    check_geometry(rows, columns, source)
    size = rows * columns * -(-bits // 8)
    if size > MAX_BYTES:
        raise ImageError(
            ImageErrorReason.GEOMETRY,
            f"{what} of {rows} x {columns} pixels of {bits} bits ({size} bytes) exceeds the decode budget of {MAX_BYTES} bytes",
            source,
        )


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """The dataset's file meta, or one that states the encoding it was read with."""
    meta = FileMetaDataset()
    syntax = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        implicit, little = getattr(ds, "original_encoding", (False, True))
        syntax = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
        )
    meta.TransferSyntaxUID = UID(str(syntax).strip(" \x00"))
    return meta


def _copy_optional(ds: Dataset, out: Dataset, source: str) -> None:
    """Rescale, window, VOI and polarity attributes, each only when usable."""
    slope, intercept = header.number(ds, "RescaleSlope"), header.number(ds, "RescaleIntercept")
    if slope is not None and intercept is not None and slope != 0:
        out.RescaleSlope, out.RescaleIntercept = slope, intercept
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        logger.warning(
            "%s: Rescale Slope / Intercept unusable; stored values used as they are", source
        )
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


def _modality_values(stored: np.ndarray, ds: Dataset, source: str, factor: int = 1) -> np.ndarray:
    """The Modality LUT applied, as a new float array (float32 where it is exact), reduced by
    ``factor``; a Modality LUT Sequence that cannot be applied is ignored.

    A rescale is linear, so it is applied after the reduction; a LUT Sequence, before it.
    """
    dtype = np.float32 if ds.BitsStored <= FLOAT32_EXACT_BITS else np.float64
    if "ModalityLUTSequence" in ds:
        try:
            stored = apply_modality_lut(stored, ds)
        except Exception:  # noqa: BLE001 - a malformed LUT costs the LUT, not the image
            logger.warning(
                "%s: Modality LUT Sequence unusable; stored values used as they are", source
            )
    values = block_mean(stored, factor, dtype) if factor > 1 else stored.astype(dtype)
    if "RescaleSlope" in ds:  # only when usable (see _copy_optional)
        values *= float(ds.RescaleSlope)
        values += float(ds.RescaleIntercept)
    return values


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


def check_frame(ds: Dataset, source: str) -> None:
    """Refuse a compressed frame whose own header declares more than the budget, or other than the data set.

    Decoders allocate what the frame declares, not what Rows and Columns say: a 586-byte
    JPEG 2000 can declare 16384 x 16384 pixels, and 2 MB of RLE runs decode to 128 MB.

    Raises:
        ImageError: GEOMETRY beyond the budget; CORRUPT for a header that is missing,
            malformed, or disagrees with the data set; UNSUPPORTED for a size left undeclared.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        if kind(syntax) == "rle":
            check_rle(
                b"".join(_fragments(ds.PixelData)), ds.BitsAllocated // 8, ds.Rows * ds.Columns
            )
            return
        declared = declared_frame(b"".join(_fragments(ds.PixelData, CODESTREAM_HEAD)), syntax)
    except CodestreamError as exc:
        raise ImageError(ImageErrorReason.CORRUPT, str(exc), source) from exc
    except Exception as exc:  # pydicom's item parser raises several types
        raise ImageError(
            ImageErrorReason.CORRUPT,
            f"compressed pixel data not encapsulated ({_one_line(exc)})",
            source,
        ) from exc
    if declared is not None:
        _check_declared(declared, ds, source)


def _check_declared(declared: Declared, ds: Dataset, source: str) -> None:
    if declared.rows == 0 or declared.columns == 0:
        raise ImageError(
            ImageErrorReason.UNSUPPORTED,
            "codestream does not declare its size in its header",
            source,
        )
    check_budget(
        declared.rows,
        declared.columns,
        declared.bits,
        f"{source} (codestream header)" if source else "codestream header",
        "codestream",
    )
    if declared.components != 1:
        raise ImageError(
            ImageErrorReason.CORRUPT,
            f"codestream declares {declared.components} components; a grayscale image has 1",
            source,
        )
    if (declared.rows, declared.columns) != (ds.Rows, ds.Columns):
        raise ImageError(
            ImageErrorReason.CORRUPT,
            f"codestream declares {declared.rows} x {declared.columns} pixels, the header {ds.Rows} x {ds.Columns}",
            source,
        )
    if declared.bits > ds.BitsAllocated:
        raise ImageError(
            ImageErrorReason.CORRUPT,
            f"codestream declares {declared.bits}-bit samples in {ds.BitsAllocated} bits allocated",
            source,
        )


def _fragments(pixel_data: bytes, limit: int | None = None) -> Iterator[bytes]:
    """The first frame's fragments (after the Basic Offset Table), up to ``limit`` bytes."""
    taken = 0
    for index, fragment in enumerate(generate_fragments(pixel_data)):
        if index == 0:
            continue  # the Basic Offset Table
        yield fragment if limit is None else fragment[: limit - taken]
        taken += len(fragment)
        if limit is not None and taken >= limit:
            return


def decode_pixels(ds: Dataset, source: str) -> np.ndarray:
    """Decode the stored values within the decode budget, with one compiled plugin where one
    is installed, mapping every failure to an :class:`ImageError`."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageError(
            ImageErrorReason.UNDECODABLE, f"no decoder exists for {syntax.name}", source
        ) from exc
    if not decoder.is_available:
        raise ImageError(
            ImageErrorReason.UNDECODABLE,
            f"no installed plugin decodes {syntax.name} (needs one of: {', '.join(sorted(decoder.missing_dependencies)) or 'a decoder plugin'})",
            source,
        )
    if syntax.is_compressed:
        check_frame(ds, source)
    plugin = next((name for name in PLUGIN_PREFERENCE if name in decoder.available_plugins), "")
    try:
        arr, _ = decoder.as_array(ds, decoding_plugin=plugin)
    except MemoryError:
        raise  # the machine, not the image: worth another try later
    except BaseException as exc:
        # decoders raise ValueError, RuntimeError ..., compiled Rust ones a PanicException
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        reason = ImageErrorReason.UNDECODABLE if syntax.is_compressed else ImageErrorReason.CORRUPT
        raise ImageError(
            reason, f"pixel data could not be decoded ({syntax.name}): {_one_line(exc)}", source
        ) from exc
    _check_decoded(arr, ds, source)
    return arr


def _check_decoded(arr: np.ndarray, ds: Dataset, source: str) -> None:
    """The budget on what decoding actually gave: one frame of Rows x Columns, within MAX_BYTES."""
    if arr.ndim != 2:
        raise ImageError(
            ImageErrorReason.UNSUPPORTED, f"decoded pixel array has shape {arr.shape}", source
        )
    if arr.shape != (ds.Rows, ds.Columns) or arr.nbytes > MAX_BYTES:
        raise ImageError(
            ImageErrorReason.GEOMETRY,
            f"decoded pixel array of {arr.shape[0]} x {arr.shape[1]} ({arr.nbytes} bytes) is not the {ds.Rows} x {ds.Columns} declared within the budget",
            source,
        )


def apply_voi_window(values: np.ndarray, ds: Dataset, in_place: bool = False) -> np.ndarray:
    """Map modality values to [0, 1] by the VOI LUT, the window, or an automatic window.

    Args:
        in_place: ``values`` (a float array) may be overwritten, and is returned, where the
            mapping allows; the result keeps its float type.
    """
    if ds.get("VOILUTSequence"):
        try:
            return _apply_voi_lut_sequence(values, ds)
        except Exception:  # noqa: BLE001 - a malformed LUT costs the LUT, not the image
            logger.warning(
                "%s: VOI LUT Sequence unusable; using the window or an automatic one",
                ds.get("SOPInstanceUID", "dataset"),
            )
    out = values if in_place else None
    window = _first_window(ds)
    if window is not None:
        center, width = window
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        return window_to_unit(values, center, width, function, out)
    return auto_window(values, out)


def _float_out(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Where a mapping of ``values`` goes: ``out``, or a new array of their float type."""
    if out is not None:
        return out
    return np.empty(
        values.shape, values.dtype if values.dtype in (np.float32, np.float64) else np.float64
    )


def auto_window(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Scale to [0, 1] between robust percentiles, for images that carry no window."""
    low, high = (float(v) for v in np.percentile(values, AUTO_WINDOW_PERCENTILES))
    out = _float_out(values, out)
    if high <= low:
        out.fill(0.0)
        return out
    np.subtract(values, low, out=out)
    out /= high - low
    return np.clip(out, 0.0, 1.0, out=out)


def window_to_unit(
    values: np.ndarray,
    center: float,
    width: float,
    function: str = "LINEAR",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing, with output range [0, 1] instead of [ymin, ymax].

    Computed in the float type of ``values`` (float64 for integers), into ``out`` when given
    (which may be ``values`` itself).
    """
    center, width = float(center), float(width)
    result = _float_out(values, out)
    if function == "SIGMOID":
        np.subtract(values, center, out=result)
        result *= -4.0 / width
        np.exp(result, out=result)
        result += 1.0
        return np.reciprocal(result, out=result)
    if function == "LINEAR_EXACT":
        np.subtract(values, center, out=result)
        result /= width
    elif width <= 1:  # LINEAR with width 1 is a threshold at the center (C.11.2.1.2.1)
        np.greater(values, center - 0.5, out=result, casting="unsafe")
        return result
    else:
        np.subtract(values, center - 0.5, out=result)
        result /= width - 1
    result += 0.5
    return np.clip(result, 0.0, 1.0, out=result)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = header.number(ds, "WindowCenter"), header.number(ds, "WindowWidth")
    if center is None or width is None:
        return None
    if width <= 0:
        logger.warning(
            "ignoring a Window Width of %g (must be > 0); using an automatic window", width
        )
        return None
    return center, width


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT (C.11.2.1.1) scaled to [0, 1]: values below the first mapped one take
    the first entry, above the last one the last; one 32-bit index per pixel, no wider copy."""
    item = ds.VOILUTSequence[0]
    entries, first_mapped = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    # The range of the LUT's own entries, not its nominal bit depth: many files declare
    # 16 bits for 12-bit data.
    table = apply_voi(np.arange(first_mapped, first_mapped + entries, dtype=np.int64), ds).astype(
        np.float64
    )
    low, high = float(table.min()), float(table.max())
    dtype = values.dtype if values.dtype in (np.float32, np.float64) else np.float64
    if high <= low:
        return np.zeros(values.shape, dtype)
    scaled = ((table - low) / (high - low)).astype(dtype)
    rounded = np.rint(values)
    np.clip(rounded, first_mapped, first_mapped + entries - 1, out=rounded)
    index = rounded.astype(np.int32)
    del rounded
    index -= first_mapped
    return scaled[index]


def _larger_is_brighter(ds: Dataset) -> bool:
    photometric_says = header.text(ds, "PhotometricInterpretation") == "MONOCHROME2"
    sign = header.integer(ds, "PixelIntensityRelationshipSign")
    if sign in (1, -1) and header.text(ds, "PresentationIntentType") == "FOR PROCESSING":
        # -1: higher values mean less beam intensity, i.e. more attenuation: brighter.
        sign_says = sign == -1
        if sign_says != photometric_says:
            logger.warning(
                "Pixel Intensity Relationship Sign %+d disagrees with the photometric interpretation; following the sign",
                sign,
            )
        return sign_says
    return photometric_says


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing, else None.

    Zero or negative values, which real files carry, count as absent; so does a spacing whose
    rows and columns differ by more than :data:`MAX_SPACING_RATIO` (it would make square-pixel
    resampling stretch the image that much), with a warning that names the attribute.
    """
    for keyword, name in (
        ("PixelSpacing", "Pixel Spacing"),
        ("ImagerPixelSpacing", "Imager Pixel Spacing"),
    ):
        found = header.numbers(ds, keyword)
        if found is not None and len(found) == 2 and all(0 < v < 1e4 for v in found):
            if max(found) > MAX_SPACING_RATIO * min(found):
                logger.warning(
                    "%s: rows and columns differ by more than %g:1, as in no radiograph; treated as unknown",
                    name,
                    MAX_SPACING_RATIO,
                )
                continue
            return found[0], found[1]
    return None
