"""The names of the map sources, and which graph draws which: no PyTorch.

A *map source* is one way a network shows where it looked (:mod:`dp_model.explain` computes
them); a bundle's contract names the one its regions come from, and its ONNX graph records
the one it draws (:mod:`dp_model.onnx_graph`). The contract and the node serving a graph read
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


def draws(drawn: str | None, source: str) -> bool:
    """Whether a graph that draws the maps of ``drawn`` gives those of ``source``: the same
    source, or CAM for Grad-CAM (a graph draws CAM only for a network where CAM is exact,
    and there the two are the same map; :func:`dp_model.onnx_graph.graph_source`)."""
    return drawn == source or (source == GRAD_CAM and drawn == CAM)
