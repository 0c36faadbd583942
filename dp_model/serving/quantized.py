"""An 8-bit copy of the served graph, ``models/model.int8.onnx``, kept only where it decides as
the float graph does on held-out images.

``dp-train`` quantizes the float graph (:mod:`dp_model.serving.onnx_graph`) with ONNX Runtime's
static quantization: QDQ format, the convolutions of the residual stages with weights int8 per
output channel and activations uint8 with ranges from :data:`CALIBRATION_IMAGES` canvases of
the training split (min-max); the stem and the heads stay in float (:func:`kept_in_float`). It
runs about three times faster on a CPU with 8-bit dot products (AVX-VNNI, AVX-512 VNNI), and it computes
other numbers than the float graph, so it earns its place on the validation split, through
the node's own runner (calibration, operating points, the out-of-distribution gate):

* every image's served decision is the float graph's (:func:`decisions`: assessed or turned
  away, positive, flagged for triage, the label and the findings), and
* each output class's AUC (one against the rest) is within :data:`MAX_AUC_GAP` of the float
  graph's.

A graph that fails either is not kept (the reason is logged and recorded), and the node serves
the float graph. The test split is run once, after the choice, and its figures are recorded
beside the validation's (``models/model.int8.json``). The node serves the 8-bit graph only when
asked (``engine: onnx-int8``, at the bundle's own operating point with the gate on: the
decisions it was compared on); its results then carry another rendition
(:func:`pacs_node.results.identity.rendition`), since their probabilities may differ from the
float graph's by a few points (0.03 on the demonstration bundle's validation images). The
regions drawn from its maps are not compared.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import roc_auc
from .contract import ModelContract
from .isa import int8_features
from .onnx_session import INT8_FILE, INT8_RECORD, onnx_path
from .served import served_decisions

__all__ = [
    "CALIBRATION_IMAGES",
    "INT8_FILE",
    "MAX_AUC_GAP",
    "Agreement",
    "agreement",
    "decisions",
    "quantize",
    "record_path",
]

logger = logging.getLogger(__name__)

#: Its record: the validation figures it was kept (or refused) on, and the test figures.
RECORD_FILE = INT8_RECORD
#: Canvases of the training split whose activations set the 8-bit ranges.
CALIBRATION_IMAGES = 64
#: The largest difference of any class's AUC from the float graph's that is accepted.
MAX_AUC_GAP = 0.005


def record_path(bundle: str | Path) -> Path:
    return Path(bundle) / "models" / RECORD_FILE


def quantize(float_graph: Path, out: Path, calibration: np.ndarray) -> list[str]:
    """Write the 8-bit copy of ``float_graph`` to ``out``, its activation ranges from the
    canvases ``calibration`` ``(N, 1, S, S)`` float32 in [0, 1]; the float graph's metadata
    (Device UID, map source) carried over. Returns the convolutions left in float."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_session import INPUT

    class Canvases(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(np.split(calibration, len(calibration)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch, np.float32)}

    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_graph), str(prepared))
        floating = kept_in_float(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(out),
            Canvases(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=floating,
        )
    source, model = onnx.load(str(float_graph)), onnx.load(str(out))
    del model.metadata_props[:]
    for entry in source.metadata_props:
        added = model.metadata_props.add()
        added.key, added.value = entry.key, entry.value
    onnx.save(model, str(out))
    return floating


def kept_in_float(model) -> list[str]:
    """The convolutions left in float: the stem (it reads the radiograph itself, one channel:
    little of the time, much of the precision) and the heads of few channels (the lesion maps,
    attention gates), whose outputs are read as they are. The residual stages, nearly all
    of the time, run in 8 bits."""
    initializers = {t.name: t for t in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    kept = [convs[0].name] if convs else []
    for node in convs[1:]:
        weight = initializers.get(node.input[1])
        if weight is not None and weight.dims and weight.dims[0] < MIN_QUANTIZED_CHANNELS:
            kept.append(node.name)
    return kept


#: A convolution with fewer output channels than this stays in float (:func:`kept_in_float`).
MIN_QUANTIZED_CHANNELS = 8


#: One image's served decision: assessed, positive, triage, label, findings.
Decided = tuple[bool, bool, bool, str, tuple[str, ...]]
PARTS = ("assessed", "positive", "triage", "label", "findings")


def decisions(
    contract: ModelContract, probabilities: np.ndarray, scores: np.ndarray | None
) -> list[Decided]:
    """What the node reports of each image (:func:`~dp_model.serving.served.served_decisions`:
    the contract's decision at its own points), one tuple of :data:`PARTS` per image."""
    served = served_decisions(probabilities, scores, contract)
    return list(
        zip(
            served.assessed.tolist(),
            served.positive.tolist(),
            served.triage.tolist(),
            served.label.tolist(),
            served.findings.tolist(),
            strict=True,
        )
    )


@dataclass(frozen=True, kw_only=True)
class Agreement:
    """How the 8-bit graph compares with the float graph on one split.

    Attributes:
        images: how many images.
        decisions_changed: images whose served decision differs.
        changed: of those, how many differ in each part of the decision (``assessed``: the
            out-of-distribution gate; ``positive``, ``triage``, ``label``, ``findings``).
        non_finite: images with an output of the 8-bit graph that is not a finite number.
        auc_gap: the largest difference of a class's AUC (one against the rest), absolute.
        auc_classes: the output classes whose AUC was measured (both sides present).
        largest_probability_gap: the largest difference of a calibrated probability.
    """

    images: int
    decisions_changed: int
    changed: dict[str, int]
    non_finite: int
    auc_gap: float
    auc_classes: list[str]
    largest_probability_gap: float

    @property
    def earned(self) -> bool:
        return not self.why_not()

    def why_not(self) -> str:
        """Why the graph was refused ("" when it was kept)."""
        if self.non_finite:
            return f"{self.non_finite} of {self.images} images got a non-finite output"
        if self.decisions_changed:
            return f"{self.decisions_changed} of {self.images} served decisions changed"
        if not self.auc_classes:
            return "no class's AUC could be measured (each needs images with and without it)"
        if self.auc_gap > MAX_AUC_GAP:
            return f"a class's AUC moved by {self.auc_gap:.4f} (at most {MAX_AUC_GAP})"
        return ""


Outputs = tuple[np.ndarray, np.ndarray | None]


def agreement(
    contract: ModelContract, float_outputs: Outputs, int8_outputs: Outputs, labels: np.ndarray
) -> Agreement:
    """Compare the two graphs' calibrated probabilities and gate scores on one split;
    ``labels`` index ``contract.classes``."""
    (before_p, before_s), (after_p, after_s) = float_outputs, int8_outputs
    finite = np.isfinite(after_p).all(axis=1)
    if after_s is not None:
        finite &= np.isfinite(after_s) | ~np.isfinite(np.asarray(before_s, np.float64))
    before = decisions(contract, before_p, before_s)
    after = decisions(contract, after_p, after_s)
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    parts = {
        part: sum(a[i] != b[i] for a, b in zip(before, after, strict=True))
        for i, part in enumerate(PARTS)
    }
    gaps: dict[str, float] = {}
    for k, name in enumerate(contract.output_classes):
        positive = np.asarray(labels) == contract.classes.index(name)
        gap = abs(roc_auc(positive, before_p[:, k]) - roc_auc(positive, after_p[:, k]))
        if np.isfinite(gap):
            gaps[name] = gap
    return Agreement(
        images=len(labels),
        decisions_changed=int(changed),
        changed={part: int(count) for part, count in parts.items() if count},
        non_finite=int((~finite).sum()),
        auc_gap=float(max(gaps.values(), default=0.0)),
        auc_classes=list(gaps),
        largest_probability_gap=float(
            np.nan_to_num(np.abs(before_p - after_p), nan=1.0).max(initial=0.0)
        ),
    )


def write_record(bundle: Path, record: dict[str, Any]) -> None:
    """``models/model.int8.json``: what the 8-bit graph was kept or refused on."""
    record_path(bundle).write_text(json.dumps(record, indent=1) + "\n")


def choose(
    bundle: Path,
    contract: ModelContract,
    calibration: np.ndarray,
    run: Callable[[str, str, ModelContract], tuple[Outputs, np.ndarray]],
    seed: int,
) -> str:
    """Quantize the bundle's float graph, keep it if it earns its place on the validation
    split, report the test split once; its SHA-256 for the contract's ``int8_digest`` ("":
    not kept, the file removed). Nothing is published here: the caller records the digest
    in the bundle's contract only when it is returned.

    ``run(engine, split, contract)`` gives a split's outputs by the bundle's runner with that
    engine (``onnx`` or ``onnx-int8``) under ``contract``, and its labels.
    """
    from onnxruntime import __version__ as onnxruntime_version

    from .onnx_session import file_digest

    out = onnx_path(bundle, int8=True)
    record: dict[str, Any] = {
        "kept": False,
        "why_not": "",
        "rule": (
            f"validation: no served decision changed (the gate, positive, triage, label, "
            f"findings at the bundle's own points), every class's AUC within {MAX_AUC_GAP}, "
            "every output finite; the regions drawn from the maps are not compared"
        ),
        "float_graph_sha256": contract.onnx_digest,
        "int8_graph_sha256": "",
        "onnxruntime": onnxruntime_version,
        # the integer instructions the validation ran with (dp_model.serving.isa)
        "cpu": {"int8_features": int8_features()},
        "quantization": {
            "format": "QDQ",
            "weights": "int8, per output channel",
            "activations": "uint8, min-max ranges",
            "quantized": "Conv",
            "kept_in_float": [],
            "calibration": f"{len(calibration)} canvases of the training split, seed {seed}",
        },
        "validation": None,
        "test": None,
    }
    try:
        record["quantization"]["kept_in_float"] = quantize(onnx_path(bundle), out, calibration)
        digest = record["int8_graph_sha256"] = file_digest(out)
        candidate = replace(contract, int8_digest=digest)
        (float_val, labels) = run("onnx", "val", candidate)
        (int8_val, _) = run("onnx-int8", "val", candidate)
        validation = agreement(contract, float_val, int8_val, labels)
        record["validation"], record["why_not"] = asdict(validation), validation.why_not()
        if validation.earned:
            (float_test, test_labels) = run("onnx", "test", candidate)
            (int8_test, _) = run("onnx-int8", "test", candidate)
            record["test"] = asdict(agreement(contract, float_test, int8_test, test_labels))
    except Exception as exc:  # noqa: BLE001 - the quantizer and its runs fail in many ways; the float graph serves
        lines = str(exc).strip().splitlines()
        record["why_not"] = f"could not be made or run ({(lines or [type(exc).__name__])[0]})"
    record["kept"] = not record["why_not"]
    if record["kept"]:
        logger.info(
            "8-bit graph kept: validation %d images, no decision changed; test: %d of %d changed",
            record["validation"]["images"],
            record["test"]["decisions_changed"],
            record["test"]["images"],
        )
    else:
        out.unlink(missing_ok=True)
        logger.warning("8-bit graph not kept: %s", record["why_not"])
    write_record(bundle, record)
    return str(record["int8_graph_sha256"]) if record["kept"] else ""
