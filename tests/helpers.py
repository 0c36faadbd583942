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


def p_data_tf_lengths(stream: bytes) -> list[int]:
    """The length field of every P-DATA-TF PDU (type 04H) in an upper-layer byte stream, as
    written to the wire (PS3.8 9.3: type, a reserved byte, a 4-byte big-endian length)."""
    lengths, offset = [], 0
    while offset + 6 <= len(stream):
        kind, length = stream[offset], int.from_bytes(stream[offset + 2 : offset + 6], "big")
        if kind == 0x04:
            lengths.append(length)
        offset += 6 + length
    assert offset == len(stream), "the stream does not end on a PDU boundary"
    return lengths


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


def onnx_copy(bundle: Path, folder: Path, arrays: bool = True) -> Path:
    """A copy of ``bundle`` in ``folder`` with the ONNX graph of its weights (as dp-train
    writes it, :func:`dp_model.serving.onnx_graph.write_onnx`) and, with ``arrays``, the gate's
    statistics in NumPy's form (``models/ood.npz``, :func:`dp_model.serving.gate.save_arrays`), each
    with its SHA-256 in the contract; the other model files are linked, the bundle itself is
    left as it is."""
    import json

    from dp_model.serving.gate import ARRAYS_FILE, save_arrays
    from dp_model.serving.loading import load_bundle, load_feature_statistics
    from dp_model.serving.onnx_graph import write_onnx

    folder.mkdir(parents=True)
    shutil.copytree(bundle / "configs", folder / "configs")
    for item in bundle.iterdir():
        if item.name not in ("configs", "models"):
            (folder / item.name).symlink_to(item)
    (folder / "models").mkdir()
    for item in (bundle / "models").iterdir():
        if item.name not in ("model.onnx", ARRAYS_FILE):
            (folder / "models" / item.name).symlink_to(item)
    model, contract = load_bundle(bundle)
    digest = write_onnx(folder, model, contract)
    assert digest, "the bundle's forward pass exports"
    path = folder / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["deep_pneumonia"]["onnx_digest"] = digest
    if meta["deep_pneumonia"].get("ood"):
        meta["deep_pneumonia"]["ood"].pop("arrays_digest", None)
    detector = load_feature_statistics(bundle, contract, model)
    if arrays and detector is not None:
        written = save_arrays(folder / "models" / ARRAYS_FILE, detector.arrays.state)
        meta["deep_pneumonia"]["ood"]["arrays_digest"] = written
    path.write_text(json.dumps(meta, indent=1))
    return folder


def assert_engines_agree(bundle: Path, tolerance: float = 1e-4) -> None:
    """The bundle's ONNX graph in ONNX Runtime and its weights in PyTorch give the same
    probabilities, maps and out-of-distribution scores, within ``tolerance``, for its samples
    (and their mirror images), in one batch."""
    import numpy as np
    import torch

    from dp_model.serving.runner import Runner
    from dp_transforms import load_letterboxed

    eager = Runner(bundle=bundle, device="cpu", maps=True, engine="torch")
    graph = Runner(bundle=bundle, device="cpu", maps=True, engine="onnx")
    assert (eager.engine, graph.engine) == ("torch", "onnx")
    size = eager.contract.image_size
    samples = sorted(p for p in (bundle / "samples").iterdir() if p.suffix != ".json")
    canvases = [load_letterboxed(p, size)[0] for p in samples]
    assert canvases, f"{bundle} has no samples"
    batch = torch.stack(canvases + [c.flip(-1) for c in canvases]).numpy()
    want, found = eager.run(batch), graph.run(batch)
    np.testing.assert_allclose(found.probabilities, want.probabilities, rtol=0, atol=tolerance)
    assert (found.maps is None) == (want.maps is None)
    if want.maps is not None and found.maps is not None:
        assert found.maps.shape == want.maps.shape
        np.testing.assert_allclose(found.maps, want.maps, rtol=0, atol=tolerance)
    assert (found.ood_scores is None) == (want.ood_scores is None)
    if want.ood_scores is not None:
        np.testing.assert_allclose(
            found.ood_scores, want.ood_scores, rtol=tolerance, atol=tolerance
        )


def assert_saved_scores_are_the_nodes(
    bundle: Path, data: Path, predictor=None, tolerance: float = 1e-4
) -> None:
    """The bundle's ``docs/scores_test.npz`` (what its card's served figures are computed from)
    holds, image by image, the calibrated probabilities and out-of-distribution scores that
    the node's :class:`~pacs_node.model.predictor.NodePredictor` (``predictor``, else one on
    the CPU) gives the same canvases (the test split of ``data`` as training decoded it),
    within ``tolerance``, and the node's decisions wherever the probability of pneumonia is
    not within ``tolerance`` of a threshold."""
    import numpy as np

    from dp_model.datasets.splits import hashed_id
    from dp_model.serving.served import scores_path
    from dp_model.training.calibrate import resident_splits
    from dp_transforms import ChestImage, Letterbox
    from pacs_node.model.predictor import NodePredictor, Prepared

    node = predictor or NodePredictor(bundle, "cpu")
    test = resident_splits(bundle, data, ("test",))["test"]
    size = node.contract.image_size
    canvases = test.images.float().div(255.0).numpy()
    whole = Letterbox((size, size), size)
    prepared = [Prepared(c, whole, ChestImage(c[0]), (size, size)) for c in canvases]
    found = [
        p
        for start in range(0, len(prepared), 32)
        for p in node.predict(prepared[start : start + 32])
    ]
    with np.load(scores_path(bundle, "test"), allow_pickle=False) as saved:
        order = {name: row for row, name in enumerate(saved["ids"].tolist())}
        rows = [order[hashed_id(i)] for i in test.ids]
        assert len(rows) == len(order), "the saved scores are of the bundle's test split"
        saved = {
            key: saved[key][rows]
            for key in ("probabilities", "ood_score", "pneumonia_probability")
            + ("assessed", "positive", "triage")
        }
    np.testing.assert_allclose(
        np.stack([p.probabilities for p in found]), saved["probabilities"], rtol=0, atol=tolerance
    )
    scores = np.array([np.nan if p.ood_score is None else p.ood_score for p in found])
    np.testing.assert_allclose(scores, saved["ood_score"], rtol=tolerance, atol=tolerance)
    probability = np.array([p.pneumonia_probability for p in found])
    np.testing.assert_allclose(probability, saved["pneumonia_probability"], rtol=0, atol=tolerance)
    # a decision may go either way within float noise of its threshold
    triage, gate = node.contract.triage_point, node.contract.ood
    clear = np.abs(probability - node.operating_point) > tolerance
    if triage is not None:
        clear &= np.abs(probability - triage.threshold) > tolerance
    if gate is not None:
        clear &= ~np.isclose(scores, gate.threshold, rtol=tolerance, atol=tolerance)
    for key in ("assessed", "positive", "triage"):
        decided = np.array([getattr(p, key) for p in found])
        np.testing.assert_array_equal(decided[clear], saved[key][clear], err_msg=key)
