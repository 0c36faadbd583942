"""One runner of a bundle's classifier, for the node and for the bundle's own configs.

:class:`dp_model.inference.Predictor` (what a bundle's ``inference.json`` and
``evaluate.json`` call, and ``dp-train evaluate``) and the node's
:class:`pacs_node.model.predictor.NodePredictor` both run a bundle through :class:`Runner`:
the device, the network and its contract, the out-of-distribution detector on that device,
and, when maps are asked for, the map source the contract names. One forward pass gives the
calibrated probabilities, the maps and the gate's scores (:class:`Outputs`), so that what
the bundle's evaluation measured is what the node serves.

On the CPU the forward pass runs in ONNX Runtime where the bundle carries the graph of it
(``models/model.onnx``, :mod:`dp_model.onnx_graph`) and ``onnxruntime`` is installed, and
in PyTorch otherwise (:data:`ENGINES`); calibration and the gate's score are the same code
for both.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .classifier import ClassifierBase
from .contract import ModelContract
from .explain import (
    HEATMAP_STAGE,
    default_source,
    map_sources,
    output_maps,
    same_pass_maps,
)
from .loading import BundleError, load_bundle, load_feature_statistics
from .onnx_graph import OnnxGraph, graph_source, open_graph, verified_graph
from .ood import Detector, Seen, watching

__all__ = ["ENGINES", "Outputs", "Runner", "choose_device"]

logger = logging.getLogger(__name__)

#: Who runs the forward pass: ``auto`` (ONNX Runtime on the CPU where the bundle carries a
#: graph that gives what is asked and ``onnxruntime`` is installed, PyTorch otherwise),
#: ``torch``, or ``onnx`` (refused in one line where it cannot serve).
ENGINES = ("auto", "torch", "onnx")


def choose_device(device: str | torch.device) -> torch.device:
    """``auto`` (a CUDA GPU when one is usable, else the CPU), ``cpu`` or ``cuda[:N]``.

    Raises:
        ValueError: the name is not a device, or names a CUDA GPU where none is usable.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device}: not a device; use auto, cpu or cuda[:N]") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA GPU is usable here; use --device cpu (or auto)")
    return chosen


@dataclass(frozen=True)
class Outputs:
    """What one forward pass of a batch of ``B`` canvases gives.

    Attributes:
        probabilities: calibrated probabilities ``(B, K)`` over the contract's outputs
            (:meth:`~dp_model.contract.ModelContract.probabilities`), float32 on the CPU.
        maps: ``(B, 1 or K, h, w)`` on the canvas, float on the CPU; None when the runner
            was not asked for maps.
        ood_scores: the out-of-distribution score of each image ``(B,)``; None for a bundle
            without a gate.
    """

    probabilities: np.ndarray
    maps: Tensor | None
    ood_scores: np.ndarray | None


class Runner:
    """A bundle's classifier, ready to run on canvases (letterboxed, values in [0, 1]).

    Args:
        bundle: the bundle folder.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (:func:`choose_device`).
        network: a network of the bundle's architecture to run instead of the one the bundle
            builds (the bundle's MONAI configs instantiate their own); the bundle's weights
            are loaded into it.
        maps: give maps too, from the contract's map source (a bundle that names none: the
            former default, ``map+`` of ``heatmap_stage`` or the nearest head).
        heatmap_stage: see ``maps``.
        engine: one of :data:`ENGINES`. A ``network`` given runs in PyTorch (``auto``).

    Attributes:
        engine: the engine that serves, ``torch`` or ``onnx``.

    Raises:
        BundleError: the bundle is incomplete, names a map source its network lacks, or holds
            an ONNX graph that is not its own (when the engine is not ``torch``); ``engine``
            ``onnx`` where no graph can serve.
        ValueError: the device is not usable here; an engine not of :data:`ENGINES`.
    """

    def __init__(
        self,
        *,
        bundle: str | Path,
        device: str | torch.device = "auto",
        network: nn.Module | None = None,
        maps: bool = False,
        heatmap_stage: int = HEATMAP_STAGE,
        engine: str = "auto",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: use {', '.join(ENGINES)}")
        self.device = choose_device(device)
        loaded, self.contract = load_bundle(bundle, self.device)
        self.model: nn.Module = loaded if network is None else _adopt(network, loaded)
        # the gate reads the features of the bundle's own layer, whichever module runs
        statistics = load_feature_statistics(bundle, self.contract, loaded)
        self.statistics: Detector | None = (
            None if statistics is None else statistics.to(self.device)
        )
        #: The map source (None: no maps asked for).
        self.source = (
            _map_source(bundle, self.model, self.contract, heatmap_stage) if maps else None
        )
        self._graph = None if engine == "torch" else self._onnx(bundle, engine, network)
        self.engine = "torch" if self._graph is None else "onnx"

    @torch.no_grad()
    def run(self, batch: Tensor) -> Outputs:
        """One forward pass of ``batch`` ``(B, 1, S, S)``, moved to the runner's device."""
        if self._graph is not None:
            return self._run_graph(batch)
        batch = batch.to(self.device)
        with (
            watching(self.model, self.statistics.needs_stages)
            if self.statistics is not None
            else nullcontext() as watch
        ):
            # the logits, and the maps that come from the same pass (class maps, map+)
            logits, maps = same_pass_maps(self.model, batch, self.source)
        if maps is None and self.source is not None:  # CAM and Grad-CAM: passes of their own
            maps = output_maps(self.model, batch, self.source)
        scores = (
            None
            if self.statistics is None or watch is None
            else self.statistics.score(watch.seen(logits, len(batch)))
        )
        return Outputs(
            self.contract.probabilities(logits).cpu().numpy(),
            None if maps is None else maps.float().cpu(),
            scores,
        )

    def _run_graph(self, batch: Tensor) -> Outputs:
        """:meth:`run` by the bundle's ONNX graph: the same outputs, calibrated and scored
        by the same code."""
        assert self._graph is not None
        found = {
            name: torch.from_numpy(value)
            for name, value in self._graph.run(batch.detach().float().cpu().numpy()).items()
        }
        logits = found["logits"]
        scores = None
        if self.statistics is not None:
            stages = (
                tuple(found[f"stage{i}"] for i in range(1, 5))
                if self.statistics.needs_stages
                else ()
            )
            scores = self.statistics.score(Seen(logits, found["features"], stages))
        return Outputs(
            self.contract.probabilities(logits).numpy(),
            found["maps"] if self.source is not None else None,
            scores,
        )

    def _onnx(self, bundle: str | Path, engine: str, network: nn.Module | None) -> OnnxGraph | None:
        """The bundle's graph in a session where it can serve; else None, or for ``engine``
        ``onnx`` a BundleError. A graph that is not the bundle's own is refused either way."""
        path = verified_graph(bundle, self.contract)
        why = self._cannot(path, network)
        graph = (
            open_graph(path, self.contract, torch.get_num_threads())
            if path is not None and not why
            else None
        )
        why = why or self._lacks(graph)
        if why:
            if engine == "onnx":
                raise BundleError(f"{bundle}: the onnx engine cannot serve: {why}")
            logger.info("model engine: PyTorch %s on %s (%s)", torch.__version__, self.device, why)
            return None
        logger.info(
            "model engine: ONNX Runtime on the CPU, %d threads (%s)", torch.get_num_threads(), path
        )
        return graph

    def _cannot(self, path: Path | None, network: nn.Module | None) -> str:
        """Why no graph serves here, before one is opened ("": one may)."""
        if path is None:
            return "the bundle has no ONNX graph"
        if self.device.type != "cpu":
            return f"ONNX Runtime serves on the CPU only, the device is {self.device}"
        if network is not None:
            return "a network of the caller's own runs in PyTorch"
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        return ""

    def _lacks(self, graph: OnnxGraph | None) -> str:
        """Why ``graph`` does not give what this runner is asked for ("": it does)."""
        if graph is None:
            return ""
        drawn = graph.properties.get("map_source") or None
        # what an export computes the asked source by: Grad-CAM as CAM where that is exact,
        # None where no graph can (Grad-CAM elsewhere)
        wanted = None if self.source is None else graph_source(self.model, self.source)
        if self.source is not None and (wanted is None or drawn != wanted):
            return (
                f"its graph draws the maps of {drawn or 'no source'}, {self.source} are asked for"
            )
        needs = {"features"} if self.statistics is not None else set()
        if self.statistics is not None and self.statistics.needs_stages:
            needs |= {f"stage{i}" for i in range(1, 5)}
        if not needs <= set(graph.outputs):
            return "its graph does not give the features of the out-of-distribution gate"
        return ""


def _adopt(network: nn.Module, loaded: nn.Module) -> nn.Module:
    """``network`` holding ``loaded``'s weights, in eval mode."""
    network.load_state_dict(loaded.state_dict())
    return network.eval()


def _map_source(
    bundle: str | Path, model: nn.Module, contract: ModelContract, heatmap_stage: int
) -> str:
    """The contract's map source (a bundle that names none: the former default), checked
    against those the network offers."""
    located = contract.localization
    source = default_source(model, heatmap_stage) if located is None else located.source
    offered = map_sources(model)
    if source not in offered or not isinstance(model, ClassifierBase):
        raise BundleError(
            f"{bundle}: the contract's map source {source!r} is not one this network offers ({', '.join(offered)})"
        )
    return source
