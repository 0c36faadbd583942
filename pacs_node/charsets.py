"""The Specific Character Set an output is written in (PS3.3 C.12.1.1.2, PS3.5 6.1).

The outputs copy the patient's and the study's text from the source. Written in another
character set than the source's, the same name becomes other bytes, and whatever compares the
files attribute by attribute (dicom3tools' ``dcentvfy``, a PACS reconciling demographics) sees
another patient and quarantines the result. So an output keeps the source's character set
when that set can hold every text value the output carries, and is written in UTF-8
(ISO_IR 192), which holds any, only otherwise.

A set is kept when it is one single-valued set of PS3.3 Table C.12-2 or C.12-4 whose values
Python encodes exactly (ISO 8859 parts, UTF-8, GB18030, GBK). Sets with code extensions
(ISO 2022 escape sequences: Japanese, Korean) give UTF-8, as before: the values are compared
after the node has decoded them, and re-encoding them with escape sequences byte for byte as
the source did is not something the node can promise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pydicom.dataset import Dataset

__all__ = [
    "UTF8",
    "character_set_for",
    "fit_character_set",
    "text_values",
]

UTF8 = "ISO_IR 192"
#: The single-valued Specific Character Sets an output may keep, and the codec that encodes
#: exactly their repertoire (ISO_IR 13 is left out: Python's shift_jis holds more than it).
KEPT = {
    "ISO_IR 100": "latin_1",
    "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4",
    "ISO_IR 144": "iso8859_5",
    "ISO_IR 127": "iso8859_6",
    "ISO_IR 126": "iso8859_7",
    "ISO_IR 138": "iso8859_8",
    "ISO_IR 148": "iso8859_9",
    "ISO_IR 203": "iso8859_15",
    "ISO_IR 166": "tis_620",
    UTF8: "utf_8",
    "GB18030": "gb18030",
    "GBK": "gbk",
}
#: Value representations whose values are encoded in the Specific Character Set (PS3.5 6.1.2.3).
TEXT_VRS = ("SH", "LO", "ST", "LT", "UT", "UC", "PN")


def text_values(dataset: Dataset) -> Iterator[str]:
    """Every text value of ``dataset`` that its character set encodes, nested items included."""
    for element in dataset.iterall():
        if element.VR not in TEXT_VRS or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        yield from (str(value) for value in values if not isinstance(value, bytes))


def holds(term: str, values: Iterable[str]) -> bool:
    """Whether the character set ``term`` ("" for the default repertoire, ASCII) holds ``values``."""
    codec = "ascii" if term == "" else KEPT.get(term)
    if codec is None:
        return False
    try:
        for value in values:
            value.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def character_set_for(declared: list[str], values: Iterable[str]) -> str | None:
    """The Specific Character Set of an output holding ``values`` copied from a source that
    declared ``declared``: None (the default repertoire) for ASCII, the source's own set when it
    holds them, else UTF-8."""
    kept = list(values)
    if holds("", kept):
        return None
    if len(declared) == 1 and holds(declared[0], kept):
        return declared[0]
    return UTF8


def fit_character_set(dataset: Dataset) -> None:
    """Declare UTF-8 on ``dataset`` when its declared set cannot hold every one of its text
    values (text a writer added after the patient's: a model's class label in any script).

    Strict when writing: pydicom would otherwise write '?' for what the set lacks, or raise.
    """
    declared = _declared(dataset)
    term = declared[0] if len(declared) == 1 else "" if not declared else None
    if term is None or not holds(term, text_values(dataset)):
        dataset.SpecificCharacterSet = UTF8


def _declared(dataset: Dataset) -> list[str]:
    """The terms of ``dataset``'s Specific Character Set, as read (empty: the default repertoire)."""
    value = dataset.get("SpecificCharacterSet")
    if value is None or isinstance(value, bytes):
        return []
    found = [value] if isinstance(value, str) else list(value)
    return [str(term).strip() for term in found if term is not None] if any(found) else []
