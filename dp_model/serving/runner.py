"""One runner of a bundle's classifier, for the node and for the bundle's own configs.

:class:`dp_model.serving.inference.Predictor` (what a bundle's ``inference.json`` and
``evaluate.json`` call, and ``dp-train evaluate``) and the node's
:class:`pacs_node.model.predictor.NodePredictor` both run a bundle through :class:`Runner`:
the device, the network and its contract, the out-of-distribution detector on that device,
and, when maps are asked for, the map source the contract names. One forward pass gives the
calibrated probabilities, the maps and the gate's scores (:class:`Outputs`), so that what
the bundle's evaluation measured is what the node serves.

On the CPU the forward pass runs in ONNX Runtime where the bundle carries the graph of it
(``models/model.onnx``, :mod:`dp_model.serving.onnx_graph`) and ``onnxruntime`` is installed, and
in PyTorch otherwise (:data:`ENGINES`); calibration (:func:`dp_model.serving.contract.probabilities`)
and the gate's score (:class:`dp_model.serving.gate.Arrays`) are the same NumPy code for both.

The engine is decided from the bundle's contract and its graph alone: the map source the
contract names against the one the graph records (``map_source``), the gate's kind against
the graph's outputs, and the gate's statistics in NumPy's form (``models/ood.npz``). Serving
a graph imports neither PyTorch nor MONAI; the PyTorch side (the network, its maps, the
gate's hooks) is imported only where it runs: a GPU, a network of the caller's own, a bundle
without a graph, or one written before its contract carried what the decision needs (said
in one INFO line).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .contract import ModelContract
from .gate import Arrays, needs_stages
from .isa import int8_mismatch
from .loading import BundleError, load_contract, load_gate_arrays
from .onnx_session import INT8_RECORD, STAGE_OUTPUTS, OnnxGraph, open_graph, verified_graph
from .sources import HEATMAP_STAGE, draws

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .ood import Detector

__all__ = ["ENGINES", "Outputs", "Runner", "choose_device", "device_name"]

logger = logging.getLogger(__name__)

#: Who runs the forward pass: ``auto`` (ONNX Runtime on the CPU where the bundle carries a
#: graph that gives what is asked and ``onnxruntime`` is installed, PyTorch otherwise),
#: ``torch``, ``onnx``, or ``onnx-int8``: the graph's 8-bit copy, where the bundle kept one
#: (:mod:`dp_model.serving.quantized`). ``onnx`` and ``onnx-int8`` are refused in one line
#: where they cannot serve; ``auto`` never chooses the 8-bit copy.
ENGINES = ("auto", "torch", "onnx", "onnx-int8")
#: Device files of a GPU driver (NVIDIA's, AMD's ROCm): without any, ``auto`` is the CPU
#: without asking PyTorch (whose CUDA check is what ``auto`` means where there is one).
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def choose_device(device: str | torch.device) -> torch.device:
    """``auto`` (a CUDA GPU when one is usable, else the CPU), ``cpu`` or ``cuda[:N]``.

    Raises:
        ValueError: the name is not a device, or names a CUDA GPU where none is usable.
    """
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device}: not a device; use auto, cpu or cuda[:N]") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA GPU is usable here; use --device cpu (or auto)")
    return chosen


def device_name(device: str | torch.device) -> str:
    """The device :func:`choose_device` picks, by name (``cpu``, ``cuda:0``); PyTorch is asked
    only where the answer may be a GPU (a CUDA name, or ``auto`` beside a GPU driver)."""
    name = str(device)
    if name == "cpu" or (name == "auto" and not any(map(os.path.exists, GPU_DRIVER_FILES))):
        return "cpu"
    return str(choose_device(device))


@dataclass(frozen=True)
class Outputs:
    """What one forward pass of a batch of ``B`` canvases gives.

    Attributes:
        probabilities: calibrated probabilities ``(B, K)`` over the contract's outputs
            (:meth:`~dp_model.serving.contract.ModelContract.probabilities`), float32.
        maps: ``(B, 1 or K, h, w)`` on the canvas, float32; None when the runner was not
            asked for maps.
        ood_scores: the out-of-distribution score of each image ``(B,)``; None for a bundle
            without a gate.
    """

    probabilities: np.ndarray
    maps: np.ndarray | None
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
        contract: run under this contract instead of the bundle's (training, to validate a
            graph before the bundle records it).

    Attributes:
        engine: the engine that serves, ``torch``, ``onnx`` or ``onnx-int8``.
        device: the device's name (``cpu``, ``cuda:0``).
        source: the map source (None: no maps asked for).
        statistics: the out-of-distribution detector (None: the bundle has no gate): in
            PyTorch the one that watches the network, for the graph its NumPy statistics.

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
        contract: ModelContract | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: use {', '.join(ENGINES)}")
        self.bundle = Path(bundle)
        self.device = device_name(device)
        self.contract = load_contract(bundle) if contract is None else contract
        self._model: nn.Module | None = None
        self.statistics: Detector | Arrays | None = None
        self.source: str | None = None
        self._graph = None if engine == "torch" else self._onnx(engine, network, maps)
        self.engine = (
            "torch" if self._graph is None else "onnx-int8" if engine == "onnx-int8" else "onnx"
        )
        if self._graph is None:
            self._eager(network, maps, heatmap_stage)

    @property
    def model(self) -> nn.Module:
        """The bundle's network in PyTorch (loaded on first use where the graph serves)."""
        if self._model is None:
            from .loading import load_bundle

            self._model, _ = load_bundle(self.bundle, self.device)
        return self._model

    def run(self, batch: Any) -> Outputs:
        """One forward pass of ``batch`` ``(B, 1, S, S)`` (an array or a tensor), moved to the
        runner's device."""
        if self._graph is not None:
            return self._run_graph(np.asarray(batch, np.float32))
        return self._run_eager(batch)

    def _run_graph(self, batch: np.ndarray) -> Outputs:
        """:meth:`run` by the bundle's ONNX graph."""
        assert self._graph is not None
        found = self._graph.run(batch)
        scores = None
        statistics = self.statistics
        if statistics is not None:
            # never a gate left unscored: every image would pass it
            if not isinstance(statistics, Arrays):
                raise TypeError(f"the graph's gate scores by NumPy statistics, not {statistics!r}")
            stages = tuple(found[name] for name in STAGE_OUTPUTS) if statistics.needs_stages else ()
            scores = statistics.score(found["logits"], found["features"], stages)
        return Outputs(
            self.contract.probabilities(found["logits"]),
            found["maps"].astype(np.float32) if self.source is not None else None,
            scores,
        )

    def _run_eager(self, batch: Any) -> Outputs:
        """:meth:`run` by the network in PyTorch."""
        import torch

        from ..networks.explain import output_maps, same_pass_maps
        from .ood import Watch, watching

        statistics = self.statistics
        assert not isinstance(statistics, Arrays)  # PyTorch watches with its own detector
        batch = torch.as_tensor(batch).to(self.device)
        hooks: AbstractContextManager[Watch | None] = (
            nullcontext() if statistics is None else watching(self.model, statistics.needs_stages)
        )
        with torch.no_grad():
            with hooks as watch:
                # the logits, and the maps that come from the same pass (class maps, map+)
                logits, maps = same_pass_maps(self.model, batch, self.source)
            if maps is None and self.source is not None:  # CAM and Grad-CAM: passes of their own
                maps = output_maps(self.model, batch, self.source)
        scores = (
            None
            if statistics is None or watch is None
            else statistics.score(watch.seen(logits, len(batch)))
        )
        return Outputs(
            self.contract.probabilities(logits.float().cpu().numpy()),
            None if maps is None else maps.float().cpu().numpy(),
            scores,
        )

    def _eager(self, network: nn.Module | None, maps: bool, heatmap_stage: int) -> None:
        """The PyTorch side: the network (``network`` holding the bundle's weights), the
        gate's detector on the device, the map source checked against the network's."""
        from .loading import load_bundle, load_feature_statistics

        loaded, _ = load_bundle(self.bundle, self.device)
        self._model = loaded if network is None else _adopt(network, loaded)
        # the gate reads the features of the bundle's own layer, whichever module runs
        statistics = load_feature_statistics(self.bundle, self.contract, loaded)
        self.statistics = None if statistics is None else statistics.to(self.device)
        if maps:
            self.source = _map_source(self.bundle, self._model, self.contract, heatmap_stage)

    def _onnx(self, engine: str, network: nn.Module | None, maps: bool) -> OnnxGraph | None:
        """The bundle's graph in a session where it can serve, with the gate's NumPy
        statistics and the contract's map source; else None, or for ``engine`` ``onnx`` a
        BundleError. A graph that is not the bundle's own is refused either way."""
        int8 = engine == "onnx-int8"
        path = verified_graph(self.bundle, self.contract, int8)
        why = self._cannot(path, network, maps, int8)
        graph = (
            open_graph(path, self.contract, _threads()) if path is not None and not why else None
        )
        why = why or self._lacks(graph, maps)
        if why:
            if engine != "auto":
                raise BundleError(f"{self.bundle}: the {engine} engine cannot serve: {why}")
            logger.info("model engine: PyTorch on %s (%s)", self.device, why)
            return None
        assert graph is not None
        self.statistics = load_gate_arrays(self.bundle, self.contract, graph.widths.get("features"))
        if maps and self.contract.localization is not None:  # _cannot asked for one
            self.source = self.contract.localization.source
        logger.info("model engine: ONNX Runtime on the CPU, %d threads (%s)", _threads(), path)
        return graph

    def _cannot(
        self, path: Path | None, network: nn.Module | None, maps: bool, int8: bool = False
    ) -> str:
        """Why no graph serves here, before one is opened ("": one may)."""
        if path is None and int8:
            return "the bundle kept no 8-bit graph (models/model.int8.json says why)"
        if path is None:
            return "the bundle has no ONNX graph"
        if int8 and (mismatch := int8_mismatch(path.parent / INT8_RECORD)):
            return mismatch
        if self.device != "cpu":
            return f"ONNX Runtime serves on the CPU only, the device is {self.device}"
        if network is not None:
            return "a network of the caller's own runs in PyTorch"
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if maps and self.contract.localization is None:
            return (
                "the contract names no map source (the network's default one is PyTorch's to find)"
            )
        gate = self.contract.ood
        if gate is not None and not gate.arrays_digest:
            return "the contract records no NumPy statistics of the out-of-distribution gate (models/ood.npz, written since)"
        return ""

    def _lacks(self, graph: OnnxGraph | None, maps: bool) -> str:
        """Why ``graph`` does not give what this runner is asked for ("": it does)."""
        if graph is None:
            return ""
        drawn = graph.properties.get("map_source") or None
        located = self.contract.localization
        if maps and located is not None and not draws(drawn, located.source):
            return f"its graph draws the maps of {drawn or 'no source'}, {located.source} are asked for"
        gate = self.contract.ood
        needs = set() if gate is None else {"features"}
        if gate is not None and needs_stages(gate.kind):
            needs |= set(STAGE_OUTPUTS)
        if not needs <= set(graph.outputs):
            return "its graph does not give the features of the out-of-distribution gate"
        return ""


def _threads() -> int:
    """ONNX Runtime's intra-op threads: one per core this process may use (PyTorch's default)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _adopt(network: nn.Module, loaded: nn.Module) -> nn.Module:
    """``network`` holding ``loaded``'s weights, in eval mode."""
    network.load_state_dict(loaded.state_dict())
    return network.eval()


def _map_source(
    bundle: str | Path, model: nn.Module, contract: ModelContract, heatmap_stage: int
) -> str:
    """The contract's map source (a bundle that names none: the former default), checked
    against those the network offers."""
    from ..networks.classifier import ClassifierBase
    from ..networks.explain import default_source, map_sources

    located = contract.localization
    source = default_source(model, heatmap_stage) if located is None else located.source
    offered = map_sources(model)
    if source not in offered or not isinstance(model, ClassifierBase):
        raise BundleError(
            f"{bundle}: the contract's map source {source!r} is not one this network offers ({', '.join(offered)})"
        )
    return source
