"""Who made a result and what it is called: deterministic UIDs, series, equipment.

Output UIDs are derived from the source instance, the model's Device UID (which changes with
the weights) and the node's :func:`rendition` (what else changes what a result says: the
operating point, the out-of-distribution gate, the map drawn, the node's own code). The
same image through the same model and settings gives the same identifiers, so the PACS keeps
one copy, never two; any change of what a result says gives new identifiers, so a PACS never
keeps a first answer under the UID of a different second one (PS3.3 C.12.1.1.1: one SOP
Instance UID names one content).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset

from dp_model.serving.contract import ModelContract
from pacs_node import codes
from pacs_node.codes import MANUFACTURER
from pacs_node.intake.sanitize import integer
from pacs_node.uids import derived_uid

if TYPE_CHECKING:
    from pacs_node.config import NodeConfig

__all__ = [
    "CONTENT_SETTINGS",
    "MANUFACTURER",
    "RESULTS_CODE",
    "ResultIdentity",
    "contributing_equipment",
    "derived_uid",
    "rendition",
    "results_format",
]

#: The code that decides what a result says for a given image and model, as (package, path in
#: it; "" for the whole package): the node's model runner and its prediction, the served side
#: of ``dp_model`` (runner, gate, the contract's decision rules), the writers and their codes,
#: the copy of the source's patient and study modules, the pixels the overlay is drawn from.
#: Its digest is part of every result's UIDs, so a node whose code changed never sends a
#: different object under an earlier object's UID; no version number has to be remembered and
#: raised by hand.
RESULTS_CODE = (
    ("pacs_node", "results"),
    ("pacs_node", "model"),
    ("pacs_node", "codes.py"),
    ("pacs_node", "charsets.py"),
    ("pacs_node", "intake/sanitize.py"),
    ("dp_model", "serving"),
    ("dp_transforms", ""),
)
#: The libraries whose version shows in, or shapes, a result's bytes (highdicom names itself in
#: the Contributing Equipment; pydicom writes the files; Pillow draws the overlay's text).
RESULTS_LIBRARIES = ("highdicom", "pydicom", "pillow")


@functools.cache
def results_format() -> str:
    """The digest of :data:`RESULTS_CODE`'s Python sources as installed, and of the versions of
    :data:`RESULTS_LIBRARIES`."""
    digest = hashlib.sha256()
    for package, name in RESULTS_CODE:
        spec = importlib.util.find_spec(package)  # found, not imported
        assert spec is not None and spec.submodule_search_locations, package
        root = Path(next(iter(spec.submodule_search_locations)))
        where = root / name
        for path in sorted(where.rglob("*.py")) if where.is_dir() else [where]:
            label = f"{package}/{path.relative_to(root).as_posix()}"
            digest.update(label.encode() + b"\0" + path.read_bytes())
    for library in RESULTS_LIBRARIES:
        digest.update(f"{library}=={importlib.metadata.version(library)}".encode())
    return digest.hexdigest()[:16]


#: The node's settings that change what a result says (tests/test_node_identity.py keeps every
#: other setting of NodeConfig on a list of those that do not, so a new one must be placed).
CONTENT_SETTINGS = (
    "operating_point",
    "ood_gate",
    "heatmap_stage",
    "overlay_max_side",
    "overlay_modality",
    "overlay_transfer_syntax",
    "engine",  # onnx-int8 only: the float engines compute the same numbers
)


def rendition(config: NodeConfig, model: ModelContract) -> str:
    """What, besides the source and the weights, decides what a result says: a short digest.

    The operating point in use (the configured one, else the bundle's), whether the
    out-of-distribution gate applies, the map's stage where the bundle names no map source
    (otherwise the bundle's own source is drawn, whatever the stage), the overlay's size,
    modality and transfer syntax (the same pixels in other bytes: one UID, one file), the 8-bit
    graph when it serves (``engine: onnx-int8``; its probabilities may differ by a few points), the whole
    model contract (its points, gate, temperature: a bundle recalibrated keeps its weights and
    Device UID), and :func:`results_format`. The list of outputs is not part of it: adding a
    kind does not change what the others say.
    """
    point = model.present_point.threshold
    contract = json.dumps(model.to_json(), sort_keys=True, default=str)
    settings = {
        "format": results_format(),
        "contract": hashlib.sha256(contract.encode()).hexdigest(),
        "operating_point": repr(
            float(point if config.operating_point is None else config.operating_point)
        ),
        "ood_gate": bool(config.ood_gate),
        "heatmap_stage": config.heatmap_stage if model.localization is None else None,
        "overlay_max_side": int(config.overlay_max_side),
        "overlay_modality": str(config.overlay_modality),
        "overlay_transfer_syntax": str(config.overlay_transfer_syntax),
    }
    if config.engine == "onnx-int8":  # probabilities a few points apart: other results
        settings["int8"] = True
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class ResultIdentity:
    """UIDs and numbers of the results of one source image for one model."""

    SR_SERIES_NUMBER = 9901
    SC_SERIES_NUMBER = 9902
    PR_SERIES_NUMBER = 9903

    source_uid: str
    study_uid: str
    device_uid: str
    instance_number: int
    demo: bool
    rendition: str

    @staticmethod
    def of(source: Dataset, model: ModelContract, rendition: str) -> ResultIdentity:
        """The identity of the results of ``source`` (a :func:`~pacs_node.intake.sanitize.clean_source`
        data set) under the settings digest ``rendition`` (:func:`rendition`)."""
        number = integer(source, "InstanceNumber")
        return ResultIdentity(
            source_uid=str(source.SOPInstanceUID),
            study_uid=str(source.StudyInstanceUID),
            device_uid=model.device_uid,
            instance_number=number if number is not None and number >= 0 else 1,
            demo=model.demo,
            rendition=rendition,
        )

    def instance_uid(self, role: str) -> str:
        """The SOP Instance UID of this image's result of ``role`` (a writer's role: ``sr``, ``sc``, ``pr``)."""
        return derived_uid(self.source_uid, self.device_uid, self.rendition, role)

    def series_uid(self, role: str) -> str:
        """The series of every result of ``role`` in this study, for this model."""
        return derived_uid(self.study_uid, self.device_uid, f"{role}-series")

    def tracking_uid(self, key: str) -> str:
        return derived_uid(self.source_uid, self.device_uid, self.rendition, "tracking", key)

    def series_description(self, kind: str) -> str:
        demo = " DEMO" if self.demo else ""
        return f"AI{demo} {kind} Deep Pneumonia - not for primary diagnosis"[:64]


def contributing_equipment(model: ModelContract) -> hd.ContributingEquipment:
    """The Contributing Equipment item that names the algorithm and its version."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        # highdicom takes CID 7005's own codes only
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        contribution_description=(
            "Demonstration model trained on synthetic images. " if model.demo else ""
        )
        + "AI pneumonia detection",
    )
    # IHE AI Results
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(codes.PROCESSING_ALGORITHM)]
    item.DeviceUID = model.device_uid
    return item


def _remember_iod_lookups() -> None:
    """highdicom (0.28) searches its tables of the standard's IODs, attribute by attribute, each
    time it builds an object: whether the source's IOD has pixel data (for the source's
    equipment, on every report and overlay) and whether the result's IOD has a content date and
    time; together about a tenth of the lock the node holds per image. Both are functions of
    their arguments and of tables fixed at import: each is asked once per SOP class here."""
    import highdicom.base
    import highdicom.base_content

    for module, name in (
        (highdicom.base_content, "does_iod_have_pixel_data"),
        (highdicom.base, "is_attribute_in_iod"),
    ):
        lookup = getattr(module, name)
        if getattr(lookup, "cache_info", None) is None:
            setattr(module, name, functools.cache(lookup))


_remember_iod_lookups()

#: What each result is, by SOP class: the prefix of its file name in ``output_dir``.
RESULT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",  # Comprehensive 3D SR (earlier versions)
    "1.2.840.10008.5.1.4.1.1.7": "SC",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.11.1": "PR",  # Grayscale Softcopy Presentation State
}


def result_kind(dataset: Dataset) -> str:
    """``SR``, ``SC`` or ``PR`` (the overlay's Modality may be the radiograph's, so not that)."""
    return RESULT_KINDS.get(str(dataset.SOPClassUID), "OT")
