"""Support for the node's tests: free ports, waiting, a dcmtk storescp peer, test images, sending."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from helpers import require_tool
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

T = TypeVar("T")
PATIENT_NAME = "Doe^Jane^Q"
PATIENT_ID = "PID-483920"
BIRTH_DATE = "19610214"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class StoreSCP:
    """dcmtk's storescp on a free loopback port, writing what it receives into ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "RESULTS") -> None:
        self.folder, self.ae_title, self.port = folder, ae_title, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        tool = require_tool("storescp")
        self.process = subprocess.Popen([tool, "-aet", self.ae_title, "-od", str(self.folder), "+xa", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._listening, 20, "storescp to listen")
        return self

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def received(self) -> list[Dataset]:
        return [dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file() and not p.name.startswith(".")]

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def chest_dataset(rows: int = 320, columns: int = 288, seed: int = 0, **attributes) -> Dataset:
    """A small CR frontal chest radiograph with patient identifiers the node must never log."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns]
    lungs = (np.abs(xx - columns / 2) > columns * 0.08) & (np.abs(xx - columns / 2) < columns * 0.4) & (yy > rows * 0.15) & (yy < rows * 0.8)
    pixels = np.where(lungs, 900, 2800) + rng.normal(0, 60, (rows, columns))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261122", "101500", "ACC1", "1"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "Test"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = 1, 1, ["L", "F"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def send(port: int, datasets: list[Dataset], calling: str = "TESTSCU", called: str = "DPNODE") -> list[int]:
    """C-STORE ``datasets`` over one association; the status of each (-1: no response)."""
    ae = AE(ae_title=calling)
    for syntax in {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"association with the node failed (calling {calling}, called {called})"
    try:
        return [int(status.Status) if status else -1 for status in (assoc.send_c_store(ds) for ds in datasets)]
    finally:
        assoc.release()
