"""Old import paths kept for one release after their modules moved, each with a dated warning.

On 2026-12-06 the flat root of :mod:`dp_model` was split into :mod:`dp_model.networks` (the
PyTorch networks and what is computed from them) and :mod:`dp_model.serving` (the contract,
bundle reading and writing, the runner and the ONNX graph), and ``dp-train`` moved to
:mod:`dp_model.training.cli`, beside the code it drives (as ``dp-synth`` is
:mod:`dp_model.synth.cli` and ``dp-node`` :mod:`pacs_node.cli`).
Bundles written before name the old paths in their MONAI configs
(``dp_model.architectures.build_network``, ``dp_model.inference.Predictor``), so each old
module stays until 0.2.0 as a small module that re-exports its new one whole
(:func:`reexport`): the very same objects, and a :class:`DeprecationWarning` that names the
new path, the date of the move and the release that drops the old one.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

#: The day the modules moved, and the release whose code no longer answers their old paths.
MOVED_ON = "2026-12-06"
REMOVED_IN = "0.2.0"


def moved_warning(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that module ``old`` is now ``new`` (``stacklevel`` 3: the line that imported the
    old module, through the re-exporting module and this function)."""
    warnings.warn(
        f"{old} moved to {new} on {MOVED_ON}; import {new} instead "
        f"(the old path is removed in {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def reexport(namespace: dict[str, Any], module: ModuleType) -> None:
    """Give the old module's ``namespace`` (its ``globals()``) every name of ``module``, the
    one it moved to, private ones included, and warn that it moved."""
    namespace.update(
        {k: v for k, v in vars(module).items() if not (k.startswith("__") and k.endswith("__"))}
    )
    if hasattr(module, "__all__"):
        namespace["__all__"] = list(module.__all__)
    spec = namespace.get("__spec__")  # run as ``python -m old``, its __name__ is "__main__"
    old = spec.name if spec is not None else namespace["__name__"]
    moved_warning(old, module.__name__, stacklevel=4)
