"""The output kinds the node can write, as data: one line per writer.

``outputs`` in the configuration names kinds from here, in the order they are listed
(audit lines, ``output_dir``); their results are built and handed over in
:func:`build_order`, the report first. A kind added here (or by :func:`register`, as a plug-in or a test does) is
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


#: The kinds built and handed over before the others, whatever their place in ``outputs``: the
#: report is what a reading list waits on and takes tens of milliseconds, where the overlay
#: takes hundreds (drawing and JPEG-LS), so the report never waits for it.
FIRST = (ReportWriter.kind,)


def build_order(writers: Iterable[ResultWriter]) -> list[ResultWriter]:
    """``writers`` in the order the worker builds and hands over their results: the kinds of
    :data:`FIRST`, then the others in their given order."""
    return sorted(writers, key=lambda writer: writer.kind not in FIRST)


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
