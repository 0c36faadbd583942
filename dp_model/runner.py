"""One runner of a bundle's classifier, for the node and for the bundle's own configs.

:class:`dp_model.inference.Predictor` (what a bundle's ``inference.json`` and
``evaluate.json`` call, and ``dp-train evaluate``) and the node's
:class:`pacs_node.model.predictor.NodePredictor` both run a bundle through :class:`Runner`:
the device, the network and its contract, the out-of-distribution detector on that device,
and, when maps are asked for, the map source the contract names. One forward pass gives the
calibrated probabilities, the maps and the gate's scores (:class:`Outputs`), so that what
the bundle's evaluation measured is what the node serves.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .classifier import ClassifierBase
from .contract import ModelContract
from .explain import (
    CLASS_MAPS,
    HEATMAP_STAGE,
    default_source,
    map_sources,
    output_maps,
    source_stage,
    stage_map,
)
from .loading import BundleError, load_bundle, load_feature_statistics
from .networks import DeepPneumoniaNet
from .ood import Detector, watching

__all__ = ["Outputs", "Runner", "choose_device"]


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

    Raises:
        BundleError: the bundle is incomplete, or names a map source its network lacks.
        ValueError: the device is not usable here.
    """

    def __init__(
        self,
        *,
        bundle: str | Path,
        device: str | torch.device = "auto",
        network: nn.Module | None = None,
        maps: bool = False,
        heatmap_stage: int = HEATMAP_STAGE,
    ) -> None:
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

    @torch.no_grad()
    def run(self, batch: Tensor) -> Outputs:
        """One forward pass of ``batch`` ``(B, 1, S, S)``, moved to the runner's device."""
        batch = batch.to(self.device)
        with (
            watching(self.model, self.statistics.needs_stages)
            if self.statistics is not None
            else nullcontext() as watch
        ):
            logits, maps = self._forward(batch)
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

    def _forward(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """The logits, and the maps that come from the same pass (class maps, ``map+``)."""
        if self.source == CLASS_MAPS:
            assert isinstance(self.model, ClassifierBase)  # _map_source checked it offers them
            return self.model.class_maps(batch)
        stage = None if self.source is None else source_stage(self.source)
        if stage is None:
            return self.model(batch), None
        # map+ and lesion: sources are offered by the MGACR network only (map_sources).
        assert isinstance(self.model, DeepPneumoniaNet) and self.source is not None
        logits, outputs = self.model.forward_train(batch)
        return logits, stage_map(outputs[self.model.attention_stages.index(stage)], self.source)


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
