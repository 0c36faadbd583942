"""Who made a result and what it is called: deterministic UIDs, series, equipment.

Output UIDs are derived from the source instance and the model's Device UID (which
changes with the weights), so processing the same image twice with the same model gives
byte-for-byte the same identifiers, and the PACS keeps one copy, never two.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset

from dp_model.contract import ModelContract
from pacs_node import codes
from pacs_node.codes import MANUFACTURER
from pacs_node.intake.sanitize import integer
from pacs_node.uids import derived_uid

__all__ = ["MANUFACTURER", "ResultIdentity", "contributing_equipment", "derived_uid"]


@dataclass(frozen=True)
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

    @staticmethod
    def of(source: Dataset, model: ModelContract) -> ResultIdentity:
        """The identity of the results of ``source`` (a :func:`~pacs_node.sanitize.clean_source` data set)."""
        number = integer(source, "InstanceNumber")
        return ResultIdentity(
            str(source.SOPInstanceUID),
            str(source.StudyInstanceUID),
            model.device_uid,
            number if number is not None and number >= 0 else 1,
            model.demo,
        )

    def instance_uid(self, role: str) -> str:
        """The SOP Instance UID of this image's result of ``role`` (a writer's role: ``sr``, ``sc``, ``pr``)."""
        return derived_uid(self.source_uid, self.device_uid, role)

    def series_uid(self, role: str) -> str:
        """The series of every result of ``role`` in this study, for this model."""
        return derived_uid(self.study_uid, self.device_uid, f"{role}-series")

    def tracking_uid(self, key: str) -> str:
        return derived_uid(self.source_uid, self.device_uid, "tracking", key)

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
