"""The networks: PyTorch classifiers, their losses and the maps they draw.

* :mod:`~dp_model.networks.registry`: every classifier a bundle can name, as data (no PyTorch);
* :mod:`~dp_model.networks.classifier`: the interface every network gives;
* :mod:`~dp_model.networks.backbones`, :mod:`~dp_model.networks.networks` (Deep Pneumonia's
  MGACR network, the torchvision baselines, SimCLR), :mod:`~dp_model.networks.variants`
  (class attention, CIA-Net): the networks themselves;
* :mod:`~dp_model.networks.architectures`: a network by name, and its outputs as class scores;
* :mod:`~dp_model.networks.losses`: the papers' losses;
* :mod:`~dp_model.networks.explain`: Grad-CAM, CAM and the networks' own maps.

Until 0.2.0 this package also answers the names of the module it replaced, ``dp_model.networks``
(now :mod:`dp_model.networks.networks`), with a ``DeprecationWarning``: configs of bundles
written before 2026-12-01 name ``dp_model.networks.build_network``. It looks them up only when
asked, so that importing the registry (``dp-train --help``, the contract) brings no PyTorch.
"""

from __future__ import annotations

from pathlib import Path


def __getattr__(name: str) -> object:
    # A submodule not imported yet (``from dp_model.networks import variants``) is found by the
    # import system once this says the package has no such attribute.
    if name.startswith("__") or (Path(__file__).parent / f"{name}.py").exists():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..deprecation import moved_warning
    from . import networks

    found = getattr(networks, name)
    moved_warning(f"{__name__}.{name}", f"{networks.__name__}.{name}")
    return found
