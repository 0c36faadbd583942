"""UIDs: what a valid one is (PS3.5 9.1) and the node's deterministic ones (PS3.5 B.2)."""

from __future__ import annotations

import hashlib
import re
import uuid

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters; and, as validators
    such as dciodvfy check, an OID under the ISO (1) or joint (2) root with at least two
    components (under ISO, the second below 40)."""
    text_value = str(value or "")
    if not (0 < len(text_value) <= 64 and _UID.match(text_value)):
        return False
    components = text_value.split(".")
    return len(components) >= 2 and (
        components[0] == "2" or (components[0] == "1" and int(components[1]) < 40)
    )


def derived_uid(*parts: str) -> str:
    """A ``2.25`` UID (PS3.5 B.2) that is a pure function of ``parts``.

    (pydicom's ``generate_uid(prefix=None, ...)`` ignores its entropy sources and is random.)
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode(errors="replace")).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"
