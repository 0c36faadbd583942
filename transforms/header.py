"""Reading header attributes the way real files need: whatever they hold, never raising.

Real-world headers carry text where a number belongs, several values where one does,
raw bytes under a wrong VR, sequences where a string was expected. These readers answer
the usable value or nothing (``None``, ``""`` or ``[]``); deciding what "nothing" means is
the caller's job (an absent window means an automatic one, absent Rows an unusable image).
"""

from __future__ import annotations

import math

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence


def values(ds: Dataset, keyword: str) -> list:
    """The values of an attribute as a list, whatever went wrong with it ([] when unusable)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert is as good as absent
        return []
    if value is None or isinstance(value, (Dataset, Sequence)):
        return []
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace").strip(" \x00").split("\\")
    if isinstance(value, (list, tuple, MultiValue)):
        return [
            v for v in value if v is not None and v != "" and not isinstance(v, (Dataset, Sequence))
        ]
    return [] if value == "" else [value]


def text(ds: Dataset, keyword: str) -> str:
    """The first value as upper-case text, stripped; "" when absent or unusable."""
    found = values(ds, keyword)
    return str(found[0]).strip(" \x00").upper() if found else ""


def texts(ds: Dataset, keyword: str) -> list[str]:
    """Every value as upper-case text, stripped."""
    return [str(v).strip(" \x00").upper() for v in values(ds, keyword)]


def numbers(ds: Dataset, keyword: str) -> list[float] | None:
    """Every value as a finite number; None when absent or when any is not a finite number."""
    found = values(ds, keyword)
    try:
        result = [float(v) for v in found]
    except (TypeError, ValueError, OverflowError):
        return None
    return result if result and all(math.isfinite(v) for v in result) else None


def number(ds: Dataset, keyword: str) -> float | None:
    """The first value as a finite number; None when absent or not a number."""
    found = numbers(ds, keyword)
    return found[0] if found else None


def integer(ds: Dataset, keyword: str) -> int | None:
    """The only value as a whole number; None when absent, several, or not a whole number."""
    found = numbers(ds, keyword)
    if not found or len(found) != 1 or found[0] != int(found[0]):
        return None
    return int(found[0])
