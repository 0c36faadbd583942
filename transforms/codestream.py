"""What a compressed frame declares about itself, read without decoding it.

A decoder allocates what the frame's own header declares, not what Rows and Columns say,
so the header is parsed the way the decoder parses it, from the frame's first byte:

* JPEG and JPEG-LS (ITU T.81 B.2, T.87 C.2): the frame starts with SOI; marker segments
  follow, each with its length, up to the first frame header (SOFn, or DHP in hierarchical
  mode), which gives the precision P, lines Y, samples per line X and components Nf.
* JPEG 2000 and HTJ2K (ISO/IEC 15444-1 A.5.1): a codestream starts with SOC immediately
  followed by SIZ, which gives Xsiz, Ysiz, the offsets XOsiz, YOsiz, the tile size and the
  components Csiz with their precision Ssiz. PS3.5 A.4.4 asks for the bare codestream; a JP2
  file (Annex I), which decoders also read, is walked box by box (LBox, TBox, XLBox) to its
  first Contiguous Codestream box ``jp2c``, whose codestream must start the same way. A SOC
  found anywhere else (inside an XML box, say) is no codestream a decoder would read.
* RLE Lossless (PS3.5 G.5): a 64-byte header of segment offsets; what each segment decodes
  to is counted from its run headers (G.3.1), without decoding a byte.

Anything that does not parse raises :class:`CodestreamError` with a one-line message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID, RLELossless

#: SOF markers of ITU T.81 (all processes; not DHT C4, JPG C8, DAC CC), DHP (which declares
#: the size of a hierarchical image) and JPEG-LS SOF55.
SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE, 0xF7}
)
SOI = b"\xff\xd8"
J2K_START = b"\xff\x4f\xff\x51"  # SOC, then SIZ: the SIZ segment must come first
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: Tiles beyond this many: the decoder's per-tile structures alone would cost hundreds of MB
#: (a radiograph is one tile, or a few dozen).
MAX_TILES = 4096
#: No RLE encoder writes more than two bytes per decoded byte (a literal run of one byte
#: between replicate runs); only no-op headers (128) could make a segment longer.
RLE_MAX_EXPANSION = 2


class CodestreamError(ValueError):
    """A compressed frame whose header is missing, malformed or not what a decoder would read."""


@dataclass(frozen=True)
class Declared:
    """What a frame header declares: the allocation a decoder will make for it."""

    rows: int
    columns: int
    components: int
    bits: int


def kind(syntax: UID) -> str:
    """``"j2k"``, ``"jpeg"`` (JPEG and JPEG-LS), ``"rle"``, or ``""`` for native syntaxes."""
    name = syntax.name.upper()
    if "JPEG 2000" in name or "HTJ2K" in name or "JPEG2000" in name:
        return "j2k"
    if "JPEG" in name:
        return "jpeg"
    if syntax == RLELossless:
        return "rle"
    return ""


def declared_frame(head: bytes, syntax: UID) -> Declared | None:
    """What the header at the start of ``head`` declares; None for syntaxes without one.

    Raises:
        CodestreamError: no header where the decoder looks for it, or a malformed one.
    """
    found = kind(syntax)
    if found == "j2k":
        return _j2k(head)
    if found == "jpeg":
        return _jpeg(head)
    return None


def _j2k(head: bytes) -> Declared:
    if head.startswith(J2K_START):
        return _siz(head, 0)
    if head.startswith(JP2_SIGNATURE):
        at = _jp2c(head)
        if not head.startswith(J2K_START, at):
            raise CodestreamError("the JP2 codestream box does not start with SOC and SIZ")
        return _siz(head, at)
    raise CodestreamError("the frame is neither a JPEG 2000 codestream (SOC, SIZ) nor a JP2 file")


def _jp2c(head: bytes) -> int:
    """Offset of the first ``jp2c`` box's contents (ISO/IEC 15444-1 I.4)."""
    at = 0
    while at + 8 <= len(head):
        length, box = struct.unpack(">I4s", head[at : at + 8])
        header = 8
        if length == 1:
            if at + 16 > len(head):
                break
            (length,) = struct.unpack(">Q", head[at + 8 : at + 16])
            header = 16
        if box == b"jp2c":
            return at + header
        if length < header:  # 0: the last box, to the end of the file; it is not a codestream
            raise CodestreamError("malformed JP2 box before the codestream box")
        at += length
    raise CodestreamError(f"no JP2 codestream box within the first {len(head)} bytes")


def _siz(head: bytes, at: int) -> Declared:
    """Parse SIZ (A.5.1) at ``at + 2`` (after SOC)."""
    body = head[at + 4 :]
    if len(body) < 2 + 2 + 32 + 2 + 3:
        raise CodestreamError("JPEG 2000 SIZ marker segment is truncated")
    x_size, y_size, x_offset, y_offset, x_tile, y_tile, x_tile_offset, y_tile_offset = (
        struct.unpack(">8I", body[4:36])
    )
    (components,) = struct.unpack(">H", body[36:38])
    if len(body) < 38 + 3 * max(components, 1):
        raise CodestreamError("JPEG 2000 SIZ marker segment is truncated")
    bits = max((body[38 + 3 * i] & 0x7F) + 1 for i in range(max(components, 1)))
    if x_tile == 0 or y_tile == 0 or x_tile_offset > x_offset or y_tile_offset > y_offset:
        raise CodestreamError("JPEG 2000 SIZ declares an invalid tile grid")
    tiles = (
        -(-(x_size - x_tile_offset) // x_tile) * -(-(y_size - y_tile_offset) // y_tile)
        if x_size > x_tile_offset and y_size > y_tile_offset
        else 0
    )
    if tiles > MAX_TILES:
        raise CodestreamError(f"JPEG 2000 SIZ declares {tiles} tiles (at most {MAX_TILES})")
    return Declared(max(0, y_size - y_offset), max(0, x_size - x_offset), components, bits)


def _jpeg(head: bytes) -> Declared:
    if not head.startswith(SOI):
        raise CodestreamError("the frame does not start with the JPEG SOI marker")
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            raise CodestreamError("JPEG marker expected between marker segments")
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            at += 2
            continue
        if marker in SOF_MARKERS:
            if at + 10 > len(head):
                break
            precision, rows, columns, components = struct.unpack(">BHHB", head[at + 4 : at + 10])
            return Declared(rows, columns, components, precision)
        if marker == 0xDA:
            raise CodestreamError("JPEG scan starts before any frame header")
        (length,) = struct.unpack(">H", head[at + 2 : at + 4])
        at += 2 + length
    raise CodestreamError(f"no JPEG frame header within the first {len(head)} bytes")


def check_rle(frame: bytes, segments: int, segment_length: int) -> None:
    """Check an RLE frame's header and that no segment decodes to more than ``segment_length`` bytes.

    Args:
        frame: the whole frame (header and segments).
        segments: how many segments the image needs (one per byte of a sample, PS3.5 G.2).
        segment_length: Rows x Columns, the bytes each segment must decode to.

    Raises:
        CodestreamError: a malformed header, the wrong number of segments, a segment longer
            than any encoder writes, or one that decodes to more than it may.
    """
    if len(frame) < 64:
        raise CodestreamError("RLE frame is shorter than its 64-byte header")
    count, *offsets = struct.unpack("<16I", frame[:64])
    if count != segments:
        raise CodestreamError(f"RLE header declares {count} segments; the image needs {segments}")
    bounds = [*offsets[:count], len(frame)]
    if (
        bounds[0] < 64
        or any(end <= start for start, end in zip(bounds, bounds[1:]))
        or bounds[-2] >= len(frame)
    ):
        raise CodestreamError("RLE segment offsets are out of order or beyond the frame")
    most = RLE_MAX_EXPANSION * segment_length + 2  # and an even-length pad byte
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end - start > most:
            raise CodestreamError(
                f"RLE segment {index} holds {end - start} bytes, more than any encoding of {segment_length} bytes"
            )
        if rle_decoded_length(frame, start, end, segment_length) > segment_length:
            raise CodestreamError(
                f"RLE segment {index} decodes to more than the {segment_length} bytes of Rows x Columns"
            )


def rle_decoded_length(data: bytes, start: int, end: int, limit: int) -> int:
    """Bytes the PackBits segment ``data[start:end]`` decodes to (PS3.5 G.3.1), counted from
    its run headers; the count stops as soon as it passes ``limit``.

    A header n of 0 to 127 copies the next n + 1 bytes, 129 to 255 repeats the next byte
    257 - n times, 128 does nothing. Runs cut short by the segment's end count what is there,
    as decoders do.
    """
    decoded, at = 0, start
    while at < end and decoded <= limit:
        header = data[at]
        if header < 128:
            decoded += min(header + 1, end - at - 1)
            at += header + 2
        elif header > 128:
            decoded += 257 - header if at + 1 < end else 0
            at += 2
        else:
            at += 1
    return decoded
