"""The one exception type for images that cannot be used, and why.

Every failure to turn a file or a dataset into pixels surfaces as :class:`ImageError`,
whatever library failed underneath. Its :attr:`ImageError.reason` is a stable code that
callers can record (the node writes it into its audit log as the skip reason); its message
is one line for a person.
"""

from __future__ import annotations

from enum import StrEnum


class ImageErrorReason(StrEnum):
    """Why an image was refused. The values are stable: logs and audit records use them."""

    NOT_FOUND = "not-found"
    NOT_AN_IMAGE = "not-an-image"
    NO_PIXEL_DATA = "no-pixel-data"
    COLOUR = "colour"
    MULTI_FRAME = "multi-frame"
    UNDECODABLE = "undecodable"
    CORRUPT = "corrupt"
    GEOMETRY = "geometry"
    UNSUPPORTED = "unsupported"


class ImageError(ValueError):
    """An input that cannot be turned into a chest X-ray image.

    Args:
        reason: the category of the problem.
        message: what is wrong, for a person; includes the offending value.
        source: the file or dataset the problem was found in.
    """

    def __init__(self, reason: ImageErrorReason, message: str, source: str = "") -> None:
        self.reason = ImageErrorReason(reason)
        self.source = source
        self.detail = message
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{message} [{self.reason}]")
