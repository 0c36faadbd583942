"""The served forward pass as an ONNX graph, ``models/model.onnx``, run by ONNX Runtime on the CPU.

``dp-train`` exports beside ``models/model.pt`` one graph that gives everything one forward
pass of :meth:`dp_model.serving.runner.Runner.run` needs (:class:`ServedGraph`): the logits, the
maps of the bundle's map source, and the features the out-of-distribution gate reads. The
calibration (:meth:`~dp_model.serving.contract.ModelContract.probabilities`) and the gate's score
stay outside the graph, in the same code as for PyTorch, so that the two engines differ
only in who runs the network. On a 2-core CPU ONNX Runtime runs the ResNet18 at 224 px in
about two thirds of PyTorch's eager time (docs/benchmarks.md).

The graph is tied to the weights twice: the contract records its SHA-256
(``onnx_digest``, checked before a session opens) and the graph records the contract's
Device UID (a metadata property, checked after). A graph that matches neither is refused,
never replaced by PyTorch in silence: a bundle whose parts disagree is not the bundle that
was validated.

Grad-CAM needs gradients, which an inference graph has not. Where CAM is exact
(``cam_exact``: one linear layer over the global average of ``cam_layer``) Grad-CAM's
weights are the classifier's divided by the number of pixels, so after scaling each map to
its peak the two are the same map, and the graph draws CAM. For Grad-CAM elsewhere no graph
is written, and such a bundle runs in PyTorch.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..networks.explain import (
    CAM,
    GRAD_CAM,
    HEATMAP_STAGE,
    cam_maps,
    default_source,
    same_pass_maps,
)
from .contract import ModelContract
from .onnx_session import INPUT, ONNX_FILE, STAGE_OUTPUTS, OnnxGraph, file_digest, onnx_path
from .ood import classifier_layer, needs_stages, watching
from .sources import drawn_as

__all__ = [
    "INPUT",
    "ONNX_FILE",
    "OPSET",
    "TOLERANCE",
    "OnnxGraph",
    "ServedGraph",
    "differences",
    "export",
    "file_digest",
    "graph_source",
    "onnx_path",
    "served_graph",
    "served_source",
    "write_onnx",
]

logger = logging.getLogger(__name__)

#: ONNX opset of the export: 17 has every operator the networks use (LayerNorm-free, no
#: AffineGrid); ONNX Runtime 1.32 runs opsets up to 23.
OPSET = 17
#: Outputs are checked against PyTorch's at export within this (absolute and relative).
TOLERANCE = 1e-4


def served_source(model: nn.Module, contract: ModelContract) -> str:
    """The map source the node draws for ``contract`` at its default settings."""
    located = contract.localization
    return default_source(model, HEATMAP_STAGE) if located is None else located.source


def graph_source(model: nn.Module, source: str) -> str | None:
    """The source the graph computes ``source``'s maps by for ``model``
    (:func:`dp_model.serving.sources.drawn_as`)."""
    return drawn_as(source, bool(model.cam_exact))


class ServedGraph(nn.Module):
    """One forward pass of ``model`` as the runner reads it, as a module of tensors only.

    Outputs, in order: ``logits`` ``(B, K)``; ``maps`` of ``source`` as the runner gives them
    (at the map's own resolution; CAM at the input's), when ``source``; with ``gate``, the
    penultimate ``features`` ``(B, D)`` and, with ``stages``, each residual stage's output
    averaged over its pixels, ``stage1`` to ``stage4``. The features are read by the gate's
    own hooks (:func:`dp_model.serving.ood.watching`), as in PyTorch.

    Args:
        model: the bundle's network, in eval mode.
        source: the map source (:func:`graph_source`'s: Grad-CAM is not one); None: no maps.
        gate: give the gate's features; stages: give the residual stages' too.
    """

    def __init__(
        self, model: nn.Module, source: str | None, gate: bool = False, stages: bool = False
    ) -> None:
        super().__init__()
        if source == GRAD_CAM:
            raise ValueError("Grad-CAM needs gradients: no graph draws it (use CAM where exact)")
        self.model, self.source, self.gate, self.stages = model, source, gate, stages
        # an inference graph: the exporter restores the wrapper's mode on every module after
        # exporting, which must leave the network in eval mode
        self.eval()

    @property
    def output_names(self) -> list[str]:
        names = ["logits"] + (["maps"] if self.source is not None else [])
        if self.gate:
            names += ["features"] + (list(STAGE_OUTPUTS) if self.stages else [])
        return names

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        activations: list[Tensor] = []
        with ExitStack() as stack:
            watch = stack.enter_context(watching(self.model, self.stages)) if self.gate else None
            if self.source == CAM:
                handle = self.model.cam_layer.register_forward_hook(
                    lambda _m, _i, output: activations.append(output)
                )
                stack.callback(handle.remove)
            logits, maps = same_pass_maps(
                self.model, x, None if self.source == CAM else self.source
            )
        if self.source == CAM:
            weight = self.model.classifier_layer.weight
            maps = cam_maps(activations[0], weight, logits.argmax(dim=1), x.shape[-2:])
        found = [logits] + ([maps.float()] if maps is not None else [])
        if watch is not None:
            seen = watch.seen(logits, x.shape[0])
            found += [seen.features, *seen.stages]
        return tuple(found)


def served_graph(model: nn.Module, contract: ModelContract) -> ServedGraph:
    """The graph of what the node runs of ``contract``: its map source and its gate's features.

    Raises:
        ValueError: the map source needs gradients (Grad-CAM where CAM is not exact).
    """
    source = served_source(model, contract)
    drawn = graph_source(model, source)
    if drawn is None:
        raise ValueError(
            f"its map source {source} needs gradients and CAM is not exact for {type(model).__name__}"
        )
    gate = contract.ood is not None and classifier_layer(model) is not None
    stages = gate and contract.ood is not None and needs_stages(contract.ood.kind)
    return ServedGraph(model, drawn, gate, stages)


def export(graph: ServedGraph, path: Path, image_size: int, device_uid: str) -> None:
    """``graph`` into ``path`` (dynamic batch axis), carrying ``device_uid`` and its map source."""
    import onnx

    example = torch.rand(2, 1, image_size, image_size)
    names = graph.output_names
    with torch.no_grad(), warnings.catch_warnings():
        # Traced constants (CIA-Net's bank size, the batch checks of the gate's hooks) are
        # constants of the trained model; the TorchScript exporter's notices are not for users.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in [INPUT, *names]},
        )
    model = onnx.load(str(path))
    for key, value in (("device_uid", device_uid), ("map_source", graph.source or "")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def write_onnx(root: Path, model: nn.Module, contract: ModelContract) -> str:
    """``models/model.onnx`` of ``model`` for ``contract`` (:func:`served_graph`), checked
    against PyTorch on random canvases; its SHA-256 for the contract's ``onnx_digest``.

    Returns "" (and writes nothing) where no graph can serve the bundle; why is logged.
    """
    model = model.eval().cpu()
    path = onnx_path(root)
    try:
        graph = served_graph(model, contract)
        export(graph, path, contract.image_size, contract.device_uid)
        differs = differences(graph, OnnxGraph(path), contract.image_size)
        if differs:
            raise ValueError(f"the graph's outputs differ from PyTorch's: {differs}")
    except Exception as exc:  # noqa: BLE001 - an exporter fails in many ways; the bundle runs in PyTorch
        path.unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("no ONNX graph written; the bundle runs in PyTorch (%s)", reason)
        return ""
    logger.info("wrote %s (ONNX opset %d, maps of %s)", path, OPSET, graph.source)
    return file_digest(path)


def differences(graph: ServedGraph, session: OnnxGraph, image_size: int) -> str:
    """What of ``graph``'s outputs ONNX Runtime does not reproduce within :data:`TOLERANCE`,
    on three random canvases (another batch than the export's); "" when all agree."""
    x = torch.rand(3, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [t.numpy() for t in graph(x)]
    found = session.run(x.numpy())
    wrong = [
        f"{name} by {np.abs(found[name] - want).max():.2g}"
        for name, want in zip(graph.output_names, expected)
        if found[name].shape != want.shape
        or not np.allclose(found[name], want, rtol=TOLERANCE, atol=TOLERANCE)
    ]
    return ", ".join(wrong)
