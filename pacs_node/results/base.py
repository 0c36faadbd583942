"""What every output kind is: a :class:`ResultWriter` builds one :class:`Result` from one
:class:`ResultContext`.

A result is bytes with a name, a media type and a kind: the outbox keeps it durably, a
destination takes it when the destination's transport carries its media type (and the
destination lists the kind, where it lists kinds), and ``output_dir`` gets it as
``<label>.<uid><suffix>``. Nothing after the writer needs to know what is inside (one
exception: a DIMSE destination that takes Comprehensive 3D SR but not Comprehensive SR gets
the report re-encoded in that class under a UID derived from the first, see
:mod:`pacs_node.delivery.cstore`): a new kind (a FHIR
DiagnosticReport, say) is one writer module and one line in :mod:`pacs_node.results.registry`,
and, when no transport carries its media type yet, one transport in
:mod:`pacs_node.delivery.registry`.

Identity: a writer names its ``role``, and :class:`~pacs_node.results.identity.ResultIdentity`
derives the instance and series UIDs from the source, the model and that role, so the same
image and model always give the same identifiers (PS3.5 B.2) and two kinds never share one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from pydicom.dataset import Dataset

from pacs_node.charsets import fit_character_set

if TYPE_CHECKING:
    from dp_model.serving.contract import ModelContract
    from pacs_node.config import NodeConfig
    from pacs_node.model.prediction import Prediction
    from pacs_node.model.predictor import Prepared
    from pacs_node.results.identity import ResultIdentity

DICOM = "application/dicom"
#: FHIR resources in JSON (FHIR R4 http.html#mime-type): the worklist message.
FHIR_JSON = "application/fhir+json"

#: What a result's suffix may not be: the outbox's sidecars are ``<uid>_<n>.json``
#: (``.fhir.json`` is a suffix of its own), partial writes end in ``.part``.
RESERVED_SUFFIXES = (".json", ".part", ".sending")
#: A suffix names a file type, never a path: dot-separated letters and digits (``.fhir.json``).
_SUFFIX = re.compile(r"(\.[A-Za-z0-9]+)+")


@dataclass(frozen=True, kw_only=True)
class ResultContext:
    """Everything the writers of one image may use; the same object for every writer.

    Attributes:
        source: the cleaned data set (:func:`~pacs_node.intake.sanitize.clean_source`), the
            only one a writer copies patient and study attributes from.
        received: the data set as it arrived (a presentation state keeps its grayscale pipeline).
        prepared: the decoded image, as displayed, and the way from the model's canvas back to it.
        prediction: what the model says, in the source's pixels.
        model: the contract of the bundle that said it.
        identity: the UIDs, series and instance number of this image's results.
        config: the node's configuration (overlay size, modality).
    """

    source: Dataset
    received: Dataset
    prepared: Prepared
    prediction: Prediction
    model: ModelContract
    identity: ResultIdentity
    config: NodeConfig


@dataclass(frozen=True, kw_only=True)
class Result:
    """One output of one image, ready to keep and to send.

    Attributes:
        kind: the writer's kind, as ``outputs`` names it (``sr``).
        label: the prefix of its file name in ``output_dir`` (``SR``).
        uid: what identifies it at a destination (the SOP Instance UID of a DICOM object); digits,
            letters, dots and dashes only, as it names files.
        data: the exact bytes digested, and sent (the 3D SR form of a report excepted, above).
        media_type: ``application/dicom`` for DICOM objects; the transport is chosen by it.
        suffix: the file suffix (``.dcm``).
    """

    kind: str
    label: str
    uid: str
    data: bytes
    media_type: str = DICOM
    suffix: str = ".dcm"

    def __post_init__(self) -> None:
        if not self.uid or not all(c.isalnum() or c in ".-" for c in self.uid):
            raise ValueError(
                f"a result's uid names files: letters, digits, dots and dashes only, got {self.uid!r}"
            )
        if (
            not _SUFFIX.fullmatch(self.suffix)
            or self.suffix in RESERVED_SUFFIXES
            or self.suffix.endswith(RESERVED_SUFFIXES[1:])
        ):
            raise ValueError(
                f"a result's suffix must be dot-separated letters and digits (.fhir.json), none of {', '.join(RESERVED_SUFFIXES)}, got {self.suffix!r}"
            )

    @property
    def file_name(self) -> str:
        """Its name in ``output_dir/<StudyInstanceUID>/``: ``SR.<uid>.dcm``."""
        return f"{self.label}.{self.uid}{self.suffix}"

    @staticmethod
    def of_dataset(dataset: Dataset, kind: str, label: str) -> Result:
        """A DICOM object as a result: its PS3.10 file, encoded once for every destination, in a
        character set that holds every one of its values (:func:`~pacs_node.charsets.fit_character_set`)."""
        fit_character_set(dataset)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return Result(
            kind=kind, label=label, uid=str(dataset.SOPInstanceUID), data=buffer.getvalue()
        )


@runtime_checkable
class ResultWriter(Protocol):
    """One output kind.

    Attributes:
        kind: its name in the configuration's ``outputs`` and a destination's ``outputs``.
        label: the prefix of its files in ``output_dir``.
        role: what its UIDs are derived under (never shared by two kinds).
        media_type: the media type of its results (``application/dicom``): which destinations
            can carry them is known before the first image.
        fail_reason: the stable reason an image fails with when building this kind raises
            (audit log, metrics, ``spool/failed/``).
    """

    kind: str
    label: str
    role: str
    media_type: str

    @property
    def fail_reason(self) -> str:  # read-only, so that a writer may name a FailReason (a str)
        ...

    def build(self, context: ResultContext) -> Result:
        """This kind's result for one image."""
        ...


def region_tracking_uid(identity: ResultIdentity, index: int) -> str:
    """The Tracking UID of lesion region ``index`` (its place in ``Prediction.boxes``), the same
    in every result that marks it: the SR's TID 1410 group (Tracking Unique Identifier, PS3.16
    TID 1410 row 3) and the presentation state's graphic object (Tracking UID (0062,0021),
    PS3.3 C.10.5.1.2), so that a viewer knows the two marks as one region."""
    return identity.tracking_uid(f"region-{index}")


def region_outline(box: Sequence[float] | np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A box ``(x0, y0, x1, y1)`` in the image's pixels as the closed polyline every result
    draws it by (the SR's SCOORD, the presentation state's graphic object): cut to the image,
    and closed by its first point again (viewers draw it open otherwise)."""
    x0, y0, x1, y1 = (
        float(np.clip(float(v), 0, limit)) for v, limit in zip(box, (columns, rows, columns, rows))
    )
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], np.float32)
