"""Support for the node's tests: free ports, waiting, dcmtk storescp and Orthanc peers, test images, sending."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from helpers import require_file, require_tool
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

if TYPE_CHECKING:
    from pacs_node.config import NodeConfig
    from pacs_node.results.identity import ResultIdentity

T = TypeVar("T")
PATIENT_NAME = "Doe^Jane^Q"
PATIENT_ID = "PID-483920"
BIRTH_DATE = "19610214"
#: The calling AE titles the tests use; a node only accepts callers it names.
TEST_CALLERS = ("TESTSCU", "MODALITY", "STORESCU", "PROBE", "ECHOSCU")


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
        """Started and listening. The free port it was given may be taken by another process
        before it binds (the tests run in parallel): then it exits, and starts on another."""
        tool = require_tool("storescp")
        for _ in range(3):
            self.process = subprocess.Popen(
                [tool, "-aet", self.ae_title, "-od", str(self.folder), "+xa", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if wait_for(self._listening_or_gone, 20, "storescp to listen") == "listening":
                time.sleep(0.2)  # a port another process listens on answers too: storescp quits
                if self.process.poll() is None:
                    return self
            self.port = free_port()
        raise AssertionError("storescp could not bind a free port three times")

    def _listening_or_gone(self) -> str:
        assert self.process is not None
        if self.process.poll() is not None:
            return "gone"
        return "listening" if self._listening() else ""

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
        return [
            dcmread(p)
            for p in sorted(self.folder.iterdir())
            if p.is_file() and not p.name.startswith(".")
        ]

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


# Orthanc sends every CR or DX radiograph it stores to the node, and nothing else. The rule
# names the radiograph storage classes as well as the modality: the node's overlay carries
# the radiograph's modality (CR) but is a Secondary Capture, so it is never routed again.
ORTHANC_ROUTE = """
local RADIOGRAPHS = { ['1.2.840.10008.5.1.4.1.1.1'] = true, ['1.2.840.10008.5.1.4.1.1.1.1'] = true }
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and RADIOGRAPHS[metadata['SopClassUid']] then
    SendToModality(instanceId, 'dpnode')
  end
end
"""
#: Where Debian's orthanc packages put their plugins, and which package brings each.
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
ORTHANC_PLUGIN_PACKAGES = {
    "libOrthancDicomWeb.so": "orthanc-dicomweb",
    "libServeFolders.so": "orthanc",
}


class Orthanc:
    """A throw-away Orthanc with its own storage, DICOM and HTTP ports on loopback.

    Args:
        folder: its configuration, storage and log.
        settings: added to its configuration (Lua scripts, modalities, DICOMweb ...).
        user: ``(name, password)`` of its one registered user; with it, HTTP authentication is on
            and every REST call here uses it.
        plugins: Debian's plugin files to load (``libOrthancDicomWeb.so``, ``libServeFolders.so``).
    """

    def __init__(
        self,
        folder: Path,
        settings: dict | None = None,
        user: tuple[str, str] | None = None,
        plugins: tuple[str, ...] = (),
    ) -> None:
        self.folder, self.dicom_port, self.http_port, self.user = (
            folder,
            free_port(),
            free_port(),
            user,
        )
        folder.mkdir(parents=True, exist_ok=True)
        settings = dict(settings or {})
        loaded = [
            str(require_file(ORTHANC_PLUGINS / name, ORTHANC_PLUGIN_PACKAGES.get(name, "orthanc")))
            for name in plugins
        ]
        config = {
            "Name": "dp-node-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": user is not None,
            "RegisteredUsers": dict([user]) if user else {},
            "Plugins": loaded + list(settings.pop("Plugins", [])),
        }
        (folder / "orthanc.json").write_text(json.dumps(config | settings))
        self.process: subprocess.Popen | None = None

    @classmethod
    def routing_to(
        cls, folder: Path, node_port: int, plugins: tuple[str, ...] = (), **settings
    ) -> Orthanc:
        """An Orthanc that sends the radiographs it stores to the node on ``node_port`` (:data:`ORTHANC_ROUTE`)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "route.lua").write_text(ORTHANC_ROUTE)
        routing = {
            "LuaScripts": [str(folder / "route.lua")],
            "DicomModalities": {"dpnode": ["DPNODE", "127.0.0.1", node_port]},
            "DicomAlwaysAllowStore": True,
        }
        return cls(folder, routing | settings, plugins=plugins)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        """Start it (again, after :meth:`stop`, on the same storage and ports)."""
        self.log = (self.folder / "orthanc.log").open("a")
        self.process = subprocess.Popen(
            [require_tool("Orthanc", "orthanc"), str(self.folder / "orthanc.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._up, 60, "Orthanc's REST API")
        return self

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"Orthanc exited ({self.process.returncode}):\n{(self.folder / 'orthanc.log').read_text()[-3000:]}"
            )
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def request(self, path: str, data: bytes | None = None, method: str = "GET"):
        """A REST call, its JSON answer."""
        return json.loads(self.request_bytes(path, data, method))

    def request_bytes(self, path: str, data: bytes | None = None, method: str = "GET") -> bytes:
        """A REST call, its answer as it came (``/instances/<id>/file``: the DICOM file)."""
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if self.user:
            request.add_header(
                "Authorization", "Basic " + base64.b64encode(":".join(self.user).encode()).decode()
            )
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def get(self, path: str):
        return self.request(path)

    def upload(self, path: Path) -> dict:
        return self.request("/instances", path.read_bytes(), "POST")

    def series_by_modality(self, study: str) -> dict[str, list[dict]]:
        """The series of an Orthanc study (its Orthanc ID) by modality; the node's overlay,
        which carries its radiograph's modality, under "SC"."""
        found: dict[str, list[dict]] = {}
        for series in self.get(f"/studies/{study}/series"):
            tags = series["MainDicomTags"]
            found.setdefault(
                "SC" if "overlay" in tags.get("SeriesDescription", "") else tags["Modality"], []
            ).append(series)
        return found

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None
            self.log.close()


def chest_dataset(rows: int = 320, columns: int = 288, seed: int = 0, **attributes) -> Dataset:
    """A small CR frontal chest radiograph with patient identifiers the node must never log."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns]
    lungs = (
        (np.abs(xx - columns / 2) > columns * 0.08)
        & (np.abs(xx - columns / 2) < columns * 0.4)
        & (yy > rows * 0.15)
        & (yy < rows * 0.8)
    )
    pixels = np.where(lungs, 900, 2800) + rng.normal(0, 60, (rows, columns))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        PATIENT_NAME,
        PATIENT_ID,
        BIRTH_DATE,
        "F",
    )
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261122", "101500", "ACC1", "1"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "Test"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = 1, 1, ["L", "F"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = (
        rows,
        columns,
        1,
        "MONOCHROME2",
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def send(
    port: int, datasets: list[Dataset], calling: str = "TESTSCU", called: str = "DPNODE"
) -> list[int]:
    """C-STORE ``datasets`` over one association; the status of each (-1: no response)."""
    ae = AE(ae_title=calling)
    for syntax in {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(sop_class, syntax)
    return _store_all(ae, port, called, datasets)


def _store_all(ae: AE, port: int, called: str, items: list) -> list[int]:
    """C-STORE each item (a data set or a file) over one association; the status of each (-1: none)."""
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, (
        f"association with the node failed (calling {ae.ae_title}, called {called})"
    )
    try:
        return [
            int(status.Status) if status else -1
            for status in (assoc.send_c_store(item) for item in items)
        ]
    finally:
        assoc.release()


def node_config(tmp_path: Path, **settings):
    """A node configuration for tests: any free port, loopback, the test callers allowed.

    Settings are configuration keys; nested ones (``tls``, ``retention`` ...) as mappings
    or as their config objects.
    """
    from dp_model.config import from_mapping, to_mapping
    from pacs_node.config import NodeConfig

    defaults = {
        "port": 0,
        "metrics_port": 0,
        "spool": str(tmp_path / "spool"),
        "output_dir": str(tmp_path / "out"),
        "bundle": "unused",
        "allow": list(TEST_CALLERS),
    }
    return from_mapping(NodeConfig, to_mapping(defaults | settings), "test")


def start_node(tmp_path: Path, predictor, **settings):
    """A started in-process node (stop it when done)."""
    from pacs_node.node import Node

    node = Node(node_config(tmp_path, **settings), predictor)
    node.start()
    return node


def audit_lines(node_or_path) -> list[dict]:
    """Every line of a node's audit log (or of the audit log at a path)."""
    path = (
        Path(node_or_path)
        if isinstance(node_or_path, (str, Path))
        else node_or_path.config.audit_path
    )
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_lines(node, status: str | None = None) -> list[dict]:
    """The audit lines that close the story of a received image (processed, skipped or failed)."""
    return [
        line
        for line in audit_lines(node)
        if line["event"] == "received" and (status is None or line["status"] == status)
    ]


class GatedPredictor:
    """The real predictor behind a gate: the model waits until the test opens it.

    Lets a test hold the worker in the middle of a batch (to fill a disk, send a
    duplicate, ...) without reaching into the node's internals.
    """

    def __init__(self, inner, open_: bool = False) -> None:
        self.inner, self.contract = inner, inner.contract
        self.gate, self.entered = threading.Event(), threading.Event()
        if open_:
            self.gate.set()

    def predict(self, prepared):
        self.entered.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return self.inner.predict(prepared)


@contextmanager
def lenient_writing() -> Iterator[None]:
    """Let pydicom write invalid values, as broken modalities do (the tests write strictly otherwise)."""
    before = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = before


def raw_element(tag: int, vr: str, value: bytes | str):
    """An element exactly as a file would hold it: ``value`` as bytes under ``vr``, valid or not."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    data = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
    if len(data) % 2:
        data += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    return RawDataElement(Tag(tag), vr, len(data), data, 0, False, True)


def write_raw(ds: Dataset, path: Path, **meta: str) -> Path:
    """Write ``ds`` as it is, invalid values and raw elements included.

    ``meta`` sets file meta elements afterwards (pydicom would otherwise make them agree
    with the data set). Raw elements (:func:`raw_element`) are written byte for byte, in
    Explicit VR Little Endian (deflated when the file meta says so).
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.filewriter import write_file_meta_info

    raw = any(isinstance(ds.get_item(tag), RawDataElement) for tag in ds.keys())  # noqa: SIM118 (a Dataset iterates elements)
    if not raw and not meta:
        with lenient_writing():
            ds.save_as(path, enforce_file_format=True)
        return path
    file_meta = ds.file_meta.copy()
    file_meta.MediaStorageSOPClassUID = file_meta.get("MediaStorageSOPClassUID") or str(
        ds.SOPClassUID
    )
    file_meta.MediaStorageSOPInstanceUID = file_meta.get("MediaStorageSOPInstanceUID") or str(
        ds.SOPInstanceUID
    )
    for keyword, value in meta.items():
        setattr(file_meta, keyword, value)
    body = _explicit_little(ds)
    if file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99":
        import zlib

        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = compressor.compress(body) + compressor.flush()
    elif (
        file_meta.TransferSyntaxUID.is_implicit_VR
        or not file_meta.TransferSyntaxUID.is_little_endian
    ):
        raise ValueError(
            "raw elements are written in an explicit little endian transfer syntax only"
        )
    with path.open("wb") as handle, lenient_writing():
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(handle, file_meta, enforce_standard=True)
        handle.write(body)
    return path


_LONG_VRS = ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")


def _explicit_little(ds: Dataset) -> bytes:
    """The data set's elements in Explicit VR Little Endian, raw ones as their bytes."""
    import struct

    from pydicom.dataelem import RawDataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element

    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    with lenient_writing():
        for tag in sorted(ds.keys()):
            element = ds.get_item(tag)
            if isinstance(element, RawDataElement):
                head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + element.VR.encode()
                head += (
                    struct.pack("<HI", 0, len(element.value))
                    if element.VR in _LONG_VRS
                    else struct.pack("<H", len(element.value))
                )
                out.write(head + element.value)
            else:
                write_data_element(out, correct_ambiguous_vr_element(element, ds, True))
    return out.getvalue()


def send_files(
    port: int,
    paths: list[Path],
    calling: str = "TESTSCU",
    called: str = "DPNODE",
    contexts: list[tuple[str, str]] | None = None,
) -> list[int]:
    """C-STORE files exactly as their bytes are (pynetdicom's chunked send): the status of each.

    The command's Affected SOP Class and Instance UIDs come from each file's meta
    information, so a file whose meta and data set disagree is sent as such.
    """
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import _config

    metas = [read_file_meta_info(p) for p in paths]  # the data sets themselves may not parse
    ae = AE(ae_title=calling)
    for pair in contexts or sorted(
        {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}
    ):
        ae.add_requested_context(*pair)
    before, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return _store_all(ae, port, called, paths)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


class FullDisk:
    """A folder on its own small file system that a test can fill up and free again.

    A real tmpfs where mounting is allowed (root, as in CI), so the node meets a real
    ENOSPC wherever it writes. Where it is not, the same episode is injected: while
    "full", every fsync of a file under the folder fails with ENOSPC, which is where a
    durable write meets a full disk first.
    """

    def __init__(self, folder: Path, size_mb: int = 64) -> None:
        self.folder, self.size_mb = folder, size_mb
        self.folder.mkdir(parents=True, exist_ok=True)
        self.mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(folder)],
                capture_output=True,
            ).returncode
            == 0
        )
        self._full = threading.Event()
        self._real_fsync = None

    def fill(self) -> None:
        """Use every free byte."""
        if self.mounted:
            with (self.folder / "filler").open("wb", buffering=0) as handle:
                for size in (2**20, 65536, 4096, 512, 1):  # then the last crumbs
                    try:
                        while True:
                            handle.write(b"\0" * size)
                    except OSError:
                        continue
            return
        import errno
        import os

        self._real_fsync = self._real_fsync or os.fsync
        real, folder, full = self._real_fsync, str(self.folder.resolve()), self._full

        def fsync(fd: int) -> None:
            if full.is_set() and os.readlink(f"/proc/self/fd/{fd}").startswith(folder):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            real(fd)

        os.fsync = fsync
        self._full.set()

    def free(self) -> None:
        (self.folder / "filler").unlink(missing_ok=True)
        self._full.clear()

    def close(self) -> None:
        self.free()
        if self._real_fsync is not None:
            import os

            os.fsync = self._real_fsync
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


#: A contract's localization that earns regions: well above the prior on every figure. Tests
#: that check how regions are drawn give it to a copy of the demo bundle (:func:`bundle_with`).
LOCALIZING = {
    "source": "map+:3",
    "shown": True,
    "margin": 0.05,
    "validation": {"iou>0.1": 0.9, "iou>0.3": 0.7, "iou>0.5": 0.4, "pointing": 0.9},
    "prior_validation": {"iou>0.1": 0.64, "iou>0.3": 0.34, "iou>0.5": 0.21, "pointing": 0.5},
    "test": {"iou>0.1": 0.88, "iou>0.3": 0.66, "iou>0.5": 0.38, "pointing": 0.87},
    "prior_test": {"iou>0.1": 0.63, "iou>0.3": 0.33, "iou>0.5": 0.2, "pointing": 0.5},
    "difference_low": 0.25,
    "images": {"validation": 400, "test": 400},
}


def bundle_with(bundle: Path, folder: Path, **fields) -> Path:
    """A copy of ``bundle`` in ``folder`` whose contract has ``fields`` set (None: removed); the weights are linked."""
    folder.mkdir(parents=True)
    for item in bundle.iterdir():
        if item.name == "configs":
            shutil.copytree(item, folder / "configs")
        elif item.name in ("models", "samples", "LICENSE"):
            (folder / item.name).symlink_to(item)
    path = folder / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    for key, value in fields.items():
        meta["deep_pneumonia"].pop(key, None)
        if value is None:  # a contract without the field: one written before it, format 1
            meta["deep_pneumonia"].pop("format", None)
        if value is not None:
            meta["deep_pneumonia"][key] = value
    path.write_text(json.dumps(meta, indent=1))
    return folder


def identity_of(source: Dataset, contract, config: NodeConfig | None = None) -> ResultIdentity:
    """The identity the node gives the results of ``source`` under ``config`` (default settings
    when None): the UIDs it derives, with the settings' share (identity.rendition)."""
    from pacs_node.config import NodeConfig
    from pacs_node.results.identity import ResultIdentity, rendition

    return ResultIdentity.of(source, contract, rendition(config or NodeConfig(), contract))


def echo_ok(port: int, called: str = "DPNODE") -> bool:
    """The node on ``port`` answers a C-ECHO (it is up, or up again after a restart)."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    assoc.release()
    return True


class CountingSCP:
    """A destination that counts every instance it stores, by SOP Instance UID, and answers
    Study Root C-FIND at IMAGE level (whether an instance is stored), as a PACS does; it can
    go down (:meth:`stop`) and come back (:meth:`start`) on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stored: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = None

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.stored[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    def _find(self, event: evt.Event):
        uid = str(event.identifier.SOPInstanceUID)
        with self.lock:
            present = self.stored[uid] > 0
        if present:
            found = Dataset()
            found.QueryRetrieveLevel, found.SOPInstanceUID = "IMAGE", uid
            yield 0xFF00, found
        yield 0x0000, None

    def start(self) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        from pacs_node.delivery.cstore import RESULT_CLASSES

        ae = AE(ae_title="RESULTS")
        for sop_class in RESULT_CLASSES:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class Modality:
    """Sends its images like a modality does: retry what was not acknowledged, until all are."""

    def __init__(
        self,
        port: int,
        images: list[Dataset],
        acknowledged: set[str],
        lock: threading.Lock,
        pause: float = 0.0,
    ) -> None:
        self.port, self.images, self.acknowledged, self.lock = port, images, acknowledged, lock
        self.pause = pause  # between two images: a burst that lasts
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        remaining = list(self.images)
        deadline = time.monotonic() + 600
        while remaining and time.monotonic() < deadline:
            ae = AE(ae_title="MODALITY")
            # a modality's patience for an answer: a node killed in the middle of a PDU
            # answers nothing, and the image is sent again
            ae.acse_timeout = ae.dimse_timeout = 10
            ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DPNODE")
            if not assoc.is_established:
                time.sleep(0.3)
                continue
            while remaining and assoc.is_established:
                status = assoc.send_c_store(remaining[0])
                if status and int(status.Status) == 0x0000:
                    with self.lock:
                        self.acknowledged.add(str(remaining.pop(0).SOPInstanceUID))
                    time.sleep(self.pause)
                elif status:
                    time.sleep(0.2)  # refused (out of resources): try again
            if assoc.is_established:
                assoc.release()
