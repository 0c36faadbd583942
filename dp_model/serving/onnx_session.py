"""A bundle's ONNX graph (``models/model.onnx``) in an ONNX Runtime session on the CPU: no PyTorch.

:mod:`dp_model.serving.onnx_graph` exports the graph from the network at ``dp-train`` time; what the
node needs to serve it (find it, check it against the contract, run it) is here, so that a
node serving a graph imports neither PyTorch nor the exporter. The graph carries metadata
properties: ``device_uid`` (the weights it was exported from) and ``map_source`` (the map
source it draws).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .contract import ModelContract
from .loading import BundleError

#: The graph's file, beside ``model.pt`` in the bundle's ``models`` folder.
ONNX_FILE = "model.onnx"
#: The graph's input: canvases ``(B, 1, S, S)`` in [0, 1], float32.
INPUT = "image"
#: The outputs of the residual stages' pooled features, for a gate that reads every stage.
STAGE_OUTPUTS = tuple(f"stage{i}" for i in range(1, 5))


#: The graph's 8-bit copy (:mod:`dp_model.serving.quantized`).
INT8_FILE = "model.int8.onnx"
#: What the 8-bit graph was kept or refused on (dp_model.serving.quantized), beside it.
INT8_RECORD = "model.int8.json"


def onnx_path(bundle: str | Path, int8: bool = False) -> Path:
    return Path(bundle) / "models" / (INT8_FILE if int8 else ONNX_FILE)


def file_digest(path: Path) -> str:
    """SHA-256 of ``path``, hex: the contract records it, the runner checks it."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxGraph:
    """A bundle's graph in an ONNX Runtime session on the CPU.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (0: ONNX Runtime's default, one per core).

    Attributes:
        outputs: the graph's output names (:attr:`dp_model.serving.onnx_graph.ServedGraph.output_names`).
        properties: what the graph carries: ``device_uid`` and ``map_source``.
    """

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ONNX Runtime's warnings go to stderr
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        #: Each output's size along its second axis (None where the graph leaves it open).
        self.widths = {
            o.name: o.shape[1] if len(o.shape) > 1 and isinstance(o.shape[1], int) else None
            for o in self.session.get_outputs()
        }
        self.properties: dict[str, Any] = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for ``batch`` ``(B, 1, S, S)`` float32, by name."""
        found = self.session.run(None, {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.outputs, found))


def verified_graph(bundle: str | Path, contract: ModelContract, int8: bool = False) -> Path | None:
    """The bundle's graph file (``int8``: its 8-bit copy), checked against the SHA-256 its
    contract records; None for a bundle without one (written before graphs were, or for a
    network no graph serves; an 8-bit copy that did not earn its place).

    Raises:
        BundleError: the file and the contract disagree: a graph the contract records no
            digest of, or another digest, or a recorded graph that is missing.
    """
    path = onnx_path(bundle, int8)
    key, recorded = (
        ("int8_digest", contract.int8_digest) if int8 else ("onnx_digest", contract.onnx_digest)
    )
    if not path.exists() and not recorded:
        return None
    if not path.exists():
        raise BundleError(
            f"{path}: missing, though metadata.json records its SHA-256 ({key}); copy the whole bundle"
        )
    if not recorded:
        raise BundleError(
            f"{path}: metadata.json records no SHA-256 of it ({key}): not this bundle's graph; remove it or export the bundle again"
        )
    if file_digest(path) != recorded:
        raise BundleError(
            f"{path}: its SHA-256 differs from the one metadata.json records (altered, or from another training)"
        )
    return path


def open_graph(path: Path, contract: ModelContract, threads: int) -> OnnxGraph:
    """A session of the verified graph at ``path``, checked to carry the contract's Device UID.

    Raises:
        BundleError: ONNX Runtime cannot load it, or it names other weights.
    """
    try:
        graph = OnnxGraph(path, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class; refused in one line
        raise BundleError(
            f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]})"
        ) from None
    if graph.properties.get("device_uid") != contract.device_uid:
        raise BundleError(
            f"{path}: the graph names the Device UID {graph.properties.get('device_uid')}, metadata.json {contract.device_uid}: not these weights' graph"
        )
    return graph
