"""The size a compressed frame declares in its own header, read without decoding it.

JPEG 2000 and HTJ2K (ISO/IEC 15444-1 A.5.1): the SIZ marker segment follows the SOC marker
and gives Xsiz, Ysiz and the image offsets XOsiz, YOsiz; the image is (Ysiz - YOsiz) rows
by (Xsiz - XOsiz) columns. JPEG and JPEG-LS (ITU T.81 B.2.2, T.87 C.2.2): the first SOFn
marker segment gives the number of lines Y and of samples per line X.
"""

from __future__ import annotations

import struct

from pydicom.uid import UID

#: SOF markers of ITU T.81 (all processes; not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
J2K_START = b"\xff\x4f\xff\x51"  # SOC, then SIZ: the SIZ segment must come first


def declared_shape(head: bytes, syntax: UID) -> tuple[int, int] | None:
    """``(rows, columns)`` the codestream at the start of ``head`` declares; None where the
    syntax carries no size (RLE) or no header was found."""
    name = syntax.name.upper()
    if "JPEG 2000" in name or "HTJ2K" in name or "JPEG2000" in name:
        return _j2k_shape(head)
    if "JPEG" in name:
        return _jpeg_shape(head)
    return None


def _j2k_shape(head: bytes) -> tuple[int, int] | None:
    at = head.find(J2K_START)
    if at < 0 or len(head) < at + 4 + 2 + 2 + 16:
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", head[at + 8 : at + 24])
    return max(0, y_size - y_offset), max(0, x_size - x_offset)


def _jpeg_shape(head: bytes) -> tuple[int, int] | None:
    at = head.find(b"\xff\xd8")
    if at < 0:
        return None
    at += 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # standalone markers
            at += 2
            continue
        (length,) = struct.unpack(">H", head[at + 2 : at + 4])
        if marker in SOF_MARKERS:
            if at + 9 > len(head):
                return None
            rows, columns = struct.unpack(">HH", head[at + 5 : at + 9])
            return rows, columns
        if marker == 0xDA:  # start of scan without a frame header
            return None
        at += 2 + length
    return None
