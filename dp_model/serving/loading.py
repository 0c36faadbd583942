"""Reading a bundle back: the network and its contract, checked against the weights; the
out-of-distribution gate's statistics; the metadata against the vendored MONAI schema.

The lowest of the bundle modules: :mod:`dp_model.serving.inference` (running a bundle on files) and
:mod:`dp_model.serving.bundle` (writing one, and the names that bundle configs and callers use)
both build on it. Bundle configs can execute code: load only bundles from people you trust.

The contract and the gate's NumPy statistics load without PyTorch (:func:`load_contract`,
:func:`load_gate_arrays`: what the node serving an ONNX graph reads); the network and the
PyTorch statistics import it when loaded.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from .contract import ContractError, ModelContract
from .gate import Arrays, arrays_path, load_arrays

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .ood import Detector

SCHEMA_FILE = "meta_schema_20240725.json"
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".mha", ".nrrd")


class BundleError(ValueError):
    """A bundle is missing a part or does not validate; the message names the file."""


def weights_uid(state: dict[str, torch.Tensor]) -> str:
    """A UID that changes whenever the weights change (the SR's Device UID), 2.25 form."""
    import hashlib
    import uuid

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return f"2.25.{uuid.UUID(bytes=digest.digest()[:16], version=5).int}"


def validate_metadata(path: Path) -> None:
    """Validate ``metadata.json`` offline against the vendored MONAI schema."""
    import jsonschema

    schema = json.loads(files("dp_model.schemas").joinpath(SCHEMA_FILE).read_text())
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    errors = sorted(
        jsonschema.Draft201909Validator(schema).iter_errors(meta), key=lambda e: list(e.path)
    )
    if errors:
        first = errors[0]
        where = "/".join(map(str, first.path)) or "top level"
        raise BundleError(f"{path}: {where}: {first.message} ({len(errors)} schema error(s))")


def load_contract(root: str | Path) -> ModelContract:
    """The contract of a bundle written by ``dp-train``, its metadata validated (no PyTorch).

    Raises:
        BundleError: not a bundle (no metadata or weights), or a contract that does not validate.
    """
    root = Path(root)
    meta_path, weights = root / "configs" / "metadata.json", root / "models" / "model.pt"
    for required in (meta_path, weights):
        if not required.exists():
            raise BundleError(
                f"{root}: not a Deep Pneumonia bundle ({required.relative_to(root)} is missing)"
            )
    validate_metadata(meta_path)
    meta = json.loads(meta_path.read_text())
    if "deep_pneumonia" not in meta:
        raise BundleError(
            f"{meta_path}: no deep_pneumonia model contract; was this bundle written by dp-train?"
        )
    try:
        return ModelContract.from_json(meta["deep_pneumonia"])
    except ContractError as exc:
        raise BundleError(f"{meta_path}: {exc}") from None


def load_bundle(
    root: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelContract]:
    """The classifier (eval mode) and its contract from a bundle written by ``dp-train``."""
    import torch

    root = Path(root)
    contract = load_contract(root)
    meta_path, weights = root / "configs" / "metadata.json", root / "models" / "model.pt"
    model = contract.network()
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise BundleError(
            f"{weights}: weights do not fit the network of metadata.json ({str(exc).splitlines()[0]})"
        ) from None
    # The Device UID names these weights in every SR: it must be theirs, not taken on trust.
    if weights_uid(state) != contract.device_uid:
        raise BundleError(
            f"{meta_path}: the Device UID {contract.device_uid} does not match its weights ({weights}); retrained or altered weights need a new bundle"
        )
    return model.to(device).eval(), contract


def load_feature_statistics(
    root: str | Path, contract: ModelContract, model: nn.Module | None = None
) -> Detector | None:
    """The out-of-distribution gate's detector (of the contract's ``ood.kind``) from its
    statistics (``models/ood.pt``), checked against the contract's digest and the network's
    feature size; None for a bundle without a gate."""
    from .ood import classifier_layer, load_detector
    from .ood import digest as ood_digest

    if contract.ood is None:
        return None
    path = Path(root) / "models" / "ood.pt"
    layer = classifier_layer(model) if model is not None else None
    try:
        if contract.ood.digest and ood_digest(path) != contract.ood.digest:
            raise ValueError(
                "its SHA-256 differs from the one metadata.json records (altered or from another training)"
            )
        return load_detector(
            path, contract.ood.kind, layer.in_features if layer is not None else None
        )
    except (
        OSError,
        RuntimeError,
        ValueError,
        KeyError,
        EOFError,
        AttributeError,
        TypeError,
    ) as exc:
        raise BundleError(
            f"{path}: the out-of-distribution gate's statistics cannot be used ({str(exc).splitlines()[0]})"
        ) from None


def load_gate_arrays(
    root: str | Path, contract: ModelContract, features: int | None = None
) -> Arrays | None:
    """The out-of-distribution gate's detector in NumPy (:class:`dp_model.serving.gate.Arrays`) from
    ``models/ood.npz``, checked against the contract's ``arrays_digest`` and ``features``
    (the penultimate dimension, when known); None for a bundle without a gate.

    Raises:
        BundleError: the contract records no NumPy statistics (a bundle written before they
            were: its gate runs in PyTorch), or they cannot be used.
    """
    if contract.ood is None:
        return None
    path = arrays_path(root)
    if not contract.ood.arrays_digest:
        raise BundleError(
            f"{path}: metadata.json records no SHA-256 of it (ood.arrays_digest): the gate's statistics are PyTorch's alone"
        )
    try:
        return load_arrays(path, contract.ood.kind, contract.ood.arrays_digest, features)
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(
            f"{path}: the out-of-distribution gate's statistics cannot be used ({str(exc).splitlines()[0]})"
        ) from None
