"""The names of the map sources, and which graph draws which: no PyTorch.

A *map source* is one way a network shows where it looked (:mod:`dp_model.networks.explain` computes
them); a bundle's contract names the one its regions come from, and its ONNX graph records
the one it draws (:mod:`dp_model.serving.onnx_graph`). The contract and the node serving a graph read
only these names, so they live apart from the PyTorch code that draws the maps.
"""

from __future__ import annotations

#: The residual stage whose MGACR ``map+`` the node draws and reports regions from.
HEATMAP_STAGE = 3

#: Names of the map sources: the MGACR ``map+`` of a stage ("map+:3"), the supervised lesion
#: head of a stage ("lesion:2"), a multi-label network's own per-finding maps, Grad-CAM, and
#: CAM (only where it is exact).
CLASS_MAPS, GRAD_CAM, CAM = "class_maps", "grad_cam", "cam"
MAP_SOURCES = (
    "map+:1",
    "map+:2",
    "map+:3",
    "map+:4",
    "lesion:1",
    "lesion:2",
    "lesion:3",
    "lesion:4",
    CLASS_MAPS,
    GRAD_CAM,
    CAM,
)


def drawn_as(source: str, cam_exact: bool) -> str | None:
    """The source a graph computes ``source``'s maps by: itself, CAM for Grad-CAM where CAM is
    exact (there the two are the same map after scaling to its peak), or None where no graph
    can give them (Grad-CAM elsewhere: it needs gradients)."""
    if source == GRAD_CAM:
        return CAM if cam_exact else None
    return source


def draws(drawn: str | None, source: str) -> bool:
    """Whether a graph that draws the maps of ``drawn`` (its ``map_source`` property) gives
    those of ``source``, by :func:`drawn_as`: a graph draws CAM only for a network where CAM
    is exact, so the graph itself says whether it is."""
    return drawn is not None and drawn == drawn_as(source, cam_exact=drawn == CAM)
