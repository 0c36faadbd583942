"""The output kinds the node can write, as data: one line per writer.

``outputs`` in the configuration names kinds from here, in the order their results are
built and sent. A kind added here (or by :func:`register`, as a plug-in or a test does) is
written, kept, audited, put in ``output_dir`` and delivered with nothing else changed; its
media type must be one a destination's transport carries to be sent
(:mod:`pacs_node.delivery.registry`).
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset

from dp_model.config import ConfigError
from pacs_node.results.base import Result, ResultWriter
from pacs_node.results.identity import result_kind
from pacs_node.results.overlay import OverlayWriter
from pacs_node.results.presentation import PresentationWriter
from pacs_node.results.report import ReportWriter
from pacs_node.results.worklist import WorklistWriter

WRITERS: dict[str, ResultWriter] = {}


def register(writer: ResultWriter) -> ResultWriter:
    """Make ``writer``'s kind available to ``outputs``; its kind, label and role must be new."""
    if not isinstance(writer, ResultWriter):
        raise TypeError(
            f"{writer!r} is not a ResultWriter (kind, label, role, media_type, fail_reason, build)"
        )
    for attribute in ("kind", "label", "role"):
        taken = [
            w.kind for w in WRITERS.values() if getattr(w, attribute) == getattr(writer, attribute)
        ]
        if taken:
            raise ValueError(
                f"output {attribute} {getattr(writer, attribute)!r} is already that of {taken[0]!r}"
            )
    WRITERS[writer.kind] = writer
    return writer


def unregister(kind: str) -> None:
    """Remove a kind added by :func:`register` (a test cleans up after itself)."""
    WRITERS.pop(kind, None)


def writers_for(kinds: Iterable[str], key: str = "outputs") -> list[ResultWriter]:
    """The writers of ``kinds``, in order; a ConfigError naming ``key`` for a kind not known."""
    kinds = list(kinds)
    unknown = [kind for kind in kinds if kind not in WRITERS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError(
            f"{key} must be one or more of {', '.join(WRITERS)}, each once, got {kinds!r}"
        )
    return [WRITERS[kind] for kind in kinds]


def dicom_result(dataset: Dataset) -> Result:
    """A DICOM object already built, as the result of the writer whose label its SOP class has
    (``SR``, ``SC``, ``PR``: kind ``gsps``), so that a destination's ``outputs`` reads it right."""
    label = result_kind(dataset)
    kind = next(
        (writer.kind for writer in WRITERS.values() if writer.label == label), label.lower()
    )
    return Result.of_dataset(dataset, kind, label)


for _writer in (ReportWriter(), OverlayWriter(), PresentationWriter(), WorklistWriter()):
    register(_writer)
