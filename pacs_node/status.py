"""C-STORE response statuses the node returns (PS3.4 Annex B.2.3) and its failure reasons, named once."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class StoreStatus(IntEnum):
    """Status of a C-STORE response.

    Refusals in the 0xA7xx range tell the sender to retry later; 0xA9xx and 0xCxxx tell it
    that retrying the same object will not help.
    """

    SUCCESS = 0x0000
    #: Spool disk nearly full or queue at its limit: the sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    #: The data set's SOP Class UID does not match the negotiated presentation context.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: The data set could not be parsed at all.
    CANNOT_UNDERSTAND = 0xC000
    #: The node is shutting down and accepts nothing new.
    SHUTTING_DOWN = 0xA701


class FailReason(StrEnum):
    """Why processing of an image failed for good; stable values, used in the audit log and metrics.

    Each names the step that failed; the image is kept in ``spool/failed/`` with the reason.
    """

    READ = "read-error"
    INFERENCE = "inference-error"
    REPORT = "report-error"
    OVERLAY = "overlay-error"
    PRESENTATION = "presentation-state-error"
    WORKLIST = "worklist-error"
    HAND_OVER = "hand-over-error"
    INTERNAL = "internal-error"
    #: In flight, alone, at three deaths of the node or its worker (a file that crashes a decoder).
    CRASH_LOOP = "crash-loop"
