"""Header mutations of a real radiograph, as broken modalities and hostile peers produce them.

Each mutant is the real RG1 header (pixels reduced four times in each direction) with one to
four mutations: random values of random types in the attributes the node reads or copies,
deleted attributes, wrong VRs, several values where one belongs, raw bytes, invalid UIDs,
unknown character sets, personal data where a code belongs. The first mutation of mutant
``i`` is the ``i``-th of :data:`PAIRS` (every attribute under every kind of mutation, once
per 420 mutants), the others are drawn from a generator seeded with ``i``: the 420 mutants
of a test run reach every pair, which 420 drawn at random would not (about 150 would be
missed); ``DP_HEADER_MUTATIONS=2000`` runs more (each mutant costs the node about 70 ms,
most of it building the SR).
"""

from __future__ import annotations

import copy
import os
import random
import struct
from pathlib import Path

import numpy as np
from node_support import raw_element
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

#: What the node reads (screening, the pixel pipeline, geometry) and what it copies into its outputs.
ATTRIBUTES = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageType",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "PixelIntensityRelationshipSign",
    "PresentationIntentType",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "InstanceNumber",
    "SeriesNumber",
    "PatientOrientation",
    "Laterality",
    "ImageLaterality",
    "Manufacturer",
    "SpecificCharacterSet",
    "BurnedInAnnotation",
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "InstitutionName",
    "SeriesDescription",
    "ManufacturerModelName",
    "SoftwareVersions",
    "OtherPatientIDs",
    "PatientWeight",
    "ConversionType",
    "PlanarConfiguration",
    "LossyImageCompression",
    "ImageComments",
    "Sensitivity",
    "KVP",
)

TEXTS = (
    "",
    " ",
    "abc",
    "-1",
    "0",
    "1e309",
    "NaN",
    "inf",
    "1\\2\\3",
    "../../etc/passwd",
    "/tmp/x",
    "DROP TABLE;",
    "Müller^José",
    "山田^太郎",
    "\x00\x01\x02",
    "CHEST",
    "PA",
    "LATERAL",
    "DERIVED\\SECONDARY",
    "MONOCHROME3",
    "1945-01-01",
    "female",
    "x" * 300,
    "1.2.03.4",
    "1.2." + "9" * 80,
    "2.25.",
    "LINEAR_EXACT",
    "SIGMOID",
    "ISO 2022 IR 87",
    "ISO_IR 999",
)
VRS = (
    "CS",
    "DS",
    "IS",
    "LO",
    "SH",
    "UI",
    "US",
    "SS",
    "UL",
    "FL",
    "FD",
    "OB",
    "UN",
    "PN",
    "DA",
    "TM",
)


def small_rg1(path: Path) -> Dataset:
    """RG1 with its pixels reduced 4 x 4 (489 x 461), header untouched otherwise."""
    ds = dcmread(path)
    pixels = ds.pixel_array[::4, ::4].astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


def mutate(base: Dataset, index: int) -> Dataset:
    """The ``index``-th mutant: a copy of ``base`` with its own SOP Instance UID and 1 to 4 mutations."""
    rng = random.Random(index)
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
        f"2.25.{1000 + index}{rng.randrange(10**12)}"
    )
    keyword, mutator = PAIRS[index % len(PAIRS)]
    mutator(ds, keyword, rng)
    for _ in range(rng.randint(0, 3)):
        keyword = rng.choice(ATTRIBUTES)
        MUTATORS[rng.randrange(len(MUTATORS))](ds, keyword, rng)
    return ds


def _delete(ds: Dataset, keyword: str, rng: random.Random) -> None:
    if keyword in ds:
        delattr(ds, keyword)


def _put(ds: Dataset, keyword: str, vr: str, value: bytes | str) -> None:
    tag = tag_for_keyword(keyword)
    ds[tag] = raw_element(tag, vr, value)


def _text(ds: Dataset, keyword: str, rng: random.Random) -> None:
    """A random text in the attribute's own VR (invalid for it, more often than not)."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    _put(ds, keyword, "UN" if vr in BINARY else vr, rng.choice(TEXTS))


def _number(ds: Dataset, keyword: str, rng: random.Random) -> None:
    """A number where a number belongs, or does not: zero, negative, huge, fractional."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    value = rng.choice([0, 1, -1, 7, 65535, 2**31, -(2**31), 0.5, 1e-300, 1e300])
    if vr in PACK:
        _put(ds, keyword, vr, struct.pack("<" + PACK[vr], _fit(vr, value)))
    else:
        _put(ds, keyword, vr if vr not in BINARY else "UN", str(value))


def _wrong_vr(ds: Dataset, keyword: str, rng: random.Random) -> None:
    """The attribute written with another VR than the dictionary's (explicit VR lets a file lie)."""
    vr = rng.choice(VRS)
    if vr in PACK:
        _put(
            ds, keyword, vr, struct.pack("<" + PACK[vr], _fit(vr, rng.choice([3, -3, 70000, 2.5])))
        )
    elif vr in ("OB", "UN"):
        _put(ds, keyword, vr, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 9))))
    else:
        _put(ds, keyword, vr, rng.choice(TEXTS))


def _multi(ds: Dataset, keyword: str, rng: random.Random) -> None:
    """Several values where one belongs (or a different number of them)."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    count = rng.randint(2, 3)
    if vr in PACK:
        _put(
            ds,
            keyword,
            vr,
            b"".join(
                struct.pack("<" + PACK[vr], _fit(vr, rng.randrange(1, 3000))) for _ in range(count)
            ),
        )
    elif vr not in BINARY:
        _put(ds, keyword, vr, "\\".join(rng.choice(TEXTS) for _ in range(count)))


def _raw(ds: Dataset, keyword: str, rng: random.Random) -> None:
    """Raw bytes of a random length under the dictionary's VR (an odd length for a number, say)."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    _put(
        ds,
        keyword,
        vr if vr != "SQ" else "UN",
        bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 7, 64]))),
    )


def _uid(ds: Dataset, keyword: str, rng: random.Random) -> None:
    """An invalid UID in one of the UIDs the outputs copy or reference."""
    keyword = rng.choice(("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"))
    _put(
        ds,
        keyword,
        "UI",
        rng.choice(
            ["1.2.03.4", "1.2." + "9" * 80, "abc", "", "1..2", "../../x", "1.2.3.", " 1.2.3"]
        ),
    )


BINARY = ("US", "SS", "UL", "FL", "FD", "OB", "OW", "SQ", "AT", "UN")
PACK = {"US": "H", "SS": "h", "UL": "I", "FL": "f", "FD": "d"}


def _fit(vr: str, value: float) -> float | int:
    """``value`` in the range the VR can hold (the file is malformed, not unwritable)."""
    if vr in ("FL", "FD"):
        return float(max(-3.0e38, min(3.0e38, value)))
    low, high = {"US": (0, 65535), "SS": (-32768, 32767), "UL": (0, 2**32 - 1)}[vr]
    return int(max(low, min(high, int(value))))


MUTATORS = (_delete, _text, _number, _wrong_vr, _multi, _raw, _uid)
#: Every attribute under every kind of mutation: the first mutation of mutant ``i`` is ``PAIRS[i % len(PAIRS)]``.
PAIRS = [(keyword, mutator) for mutator in MUTATORS for keyword in ATTRIBUTES]
#: Mutants per test run: every pair once as the first mutation, unless the environment asks for more.
MUTATIONS = int(os.environ.get("DP_HEADER_MUTATIONS", str(len(PAIRS))))
