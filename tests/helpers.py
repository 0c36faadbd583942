"""Helpers for tests: real DICOM test files and the Debian tools the tests talk to."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def data_file(name: str) -> Path:
    """Path of a file from pydicom's test data or the ``pydicom-data`` package."""
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found: is pydicom-data installed?")
    return Path(path)


def require_tool(name: str, package: str = "dcmtk / dicom3tools") -> str:
    """Path of a command-line tool; a missing tool fails in CI (make test installs it) and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package}; `make system-deps`)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_file(path: str | Path, package: str) -> Path:
    """A file a Debian package installs (a plugin, a library); missing, it fails in CI and skips elsewhere."""
    path = Path(path)
    if not path.exists():
        message = f"{path} is missing (Debian package {package}; `make system-deps`)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(
    *args: str | Path, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a tool (in ``cwd``, for tools that write files there); with ``check``, fail the
    test with its output if it exits non-zero."""
    tool = require_tool(str(args[0]))
    # errors="replace": the tools print a file's values in its own character set (Latin-1 ...)
    result = subprocess.run(
        [tool, *map(str, args[1:])],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_dataset(pixels, bits: int | None = None, photometric: str = "MONOCHROME2", **attributes):
    """A minimal single-frame grayscale Secondary Capture dataset (uncompressed) for tests."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    bits = bits or (8 if pixels.dtype == np.uint8 else 16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def write_dicom(path: Path, pixels, **kwargs) -> Path:
    """Write :func:`make_dataset` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_dataset(pixels, **kwargs).save_as(path, enforce_file_format=True)
    return path
