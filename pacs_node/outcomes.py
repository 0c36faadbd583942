"""What became of each image and each delivery: the events the pipeline and the senders emit,
and the subscribers that turn them into the audit trail, the metrics and the log.

As with pynetdicom's notification events, any number of subscribers hear every event, in the
order they subscribed; a subscriber decides nothing and returns nothing. The node subscribes
three (:class:`AuditTrail`, :class:`Counters`, :class:`LogLines`); a plug-in or a test may add
its own with :meth:`Outcomes.subscribe`. What an event means for the image (kept, failed, tried
again) was decided before it was emitted, by the pipeline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dp_model.serving.contract import ModelContract
from pacs_node.audit import AuditLog
from pacs_node.config import Destination, WebDestination
from pacs_node.metrics import Metrics
from pacs_node.model.prediction import Prediction
from pacs_node.status import FailReason

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Image:
    """One received image as the records may name it: UIDs (made safe) and who sent it, never
    patient data.

    Attributes:
        received: when it arrived (seconds since the epoch), for the time to a result.
        timings: seconds per step (decode, inference, build, total).
    """

    sop_instance_uid: str
    calling_ae: str | None = None
    peer: str | None = None
    study_instance_uid: str | None = None
    sop_class_uid: str | None = None
    received: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Processed:
    """Results written and handed over (``delivery`` says where)."""

    image: Image
    prediction: Prediction
    model: ModelContract
    outputs: list[str]
    delivery: str
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """No result, by design: not a frontal chest radiograph, unreadable (``reason`` a SkipReason)."""

    image: Image
    reason: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class Failed:
    """Processing failed for good (``reason`` a FailReason); the image is in ``folder``.
    ``deaths``: it was quarantined after that many deaths of the node with it in flight.
    ``outputs``: the results handed over before the failure (the report, when the overlay
    failed after it); they are delivered."""

    image: Image
    reason: str
    detail: str
    folder: Path
    deaths: int = 0
    outputs: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Retried:
    """Put back for a passing condition (``disk-full``, ``resources``), tried again in ``delay`` s."""

    image: Image
    reason: str
    why: str
    delay: float


@dataclass(frozen=True, kw_only=True)
class Inferred:
    """One forward pass of the model over ``images`` images."""

    seconds: float
    images: int


@dataclass(frozen=True, kw_only=True)
class Delivered:
    """A result reached ``destination`` (``reason`` None), or went to its dead letters (``reason``)."""

    destination: Destination | WebDestination
    uid: str
    source_uid: str
    reason: str | None


@dataclass(frozen=True, kw_only=True)
class Held:
    """A destination's deliveries are held until a person acts (``reason``), or resumed (None)."""

    destination: Destination | WebDestination
    reason: str | None
    detail: str


@dataclass(frozen=True, kw_only=True)
class Sent:
    """One batch on the wire to a destination took ``seconds``."""

    seconds: float


@dataclass(frozen=True, kw_only=True)
class ProtocolError:
    """A peer broke the DICOM protocol (an association aborted, a malformed PDU)."""


@dataclass(frozen=True, kw_only=True)
class NodeFailed:
    """The node gave up (a thread kept dying) and stops taking images."""

    why: str


Event = (
    Processed
    | Skipped
    | Failed
    | Retried
    | Inferred
    | Delivered
    | Held
    | Sent
    | ProtocolError
    | NodeFailed
)
Subscriber = Callable[[Event], None]


class Outcomes:
    """The node's notification events: :meth:`emit` tells every subscriber, in order."""

    def __init__(self, *subscribers: Subscriber) -> None:
        self._subscribers = list(subscribers)
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def emit(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber(event)


def result_summary(prediction: Prediction, model: ModelContract) -> dict[str, object]:
    """What the audit trail says of a result: the finding, never more than the SR states (no
    probability where no finding was asserted)."""
    result: dict[str, object] = {
        "label": prediction.label,
        "positive": prediction.positive,
        "pneumonia_probability": round(prediction.pneumonia_probability, 4),
        "regions": len(prediction.boxes),
        "model": model.name,
        "model_version": model.version,
        "assessed": prediction.assessed,
    }
    if prediction.engine:  # the 8-bit graph's numbers are not the float graph's
        result["engine"] = prediction.engine
    if prediction.triage_point is not None:
        result["triage"] = prediction.triage
    if prediction.ood_score is not None:
        result["ood_score"] = (
            round(prediction.ood_score, 2) if np.isfinite(prediction.ood_score) else None
        )
    if not prediction.assessed:
        # no finding asserted, so no probability stated either (as in the SR and SC)
        result = {k: v for k, v in result.items() if k != "pneumonia_probability"} | {
            "label": None,
            "positive": None,
            "not_assessed": "out-of-distribution",
        }
    return result


class AuditTrail:
    """Outcomes as audit lines: one per image that ends (processed, skipped, failed), per delivery
    and per hold of a destination, and one when the node gives up."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def __call__(self, event: Event) -> None:
        match event:
            case Processed():
                result = result_summary(event.prediction, event.model)
                self._image(
                    event.image,
                    "processed",
                    result=result,
                    outputs=event.outputs,
                    delivery=event.delivery,
                    detail=event.note or None,
                )
            case Skipped():
                self._image(event.image, "skipped", skip_reason=event.reason, detail=event.detail)
            case Failed():
                self._image(
                    event.image,
                    "failed",
                    reason=event.reason,
                    detail=event.detail,
                    outputs=event.outputs or None,
                )
            case Delivered():
                self.audit.write(
                    "delivery",
                    sop_instance_uid=event.source_uid,
                    outputs=[event.uid],
                    destination=str(event.destination),
                    status="delivered" if event.reason is None else "dead-letter",
                    reason=event.reason,
                )
            case Held():
                status = "held" if event.reason else "resumed"
                self.audit.write(
                    "delivery",
                    destination=str(event.destination),
                    status=status,
                    reason=event.reason,
                    detail=event.detail,
                )
            case NodeFailed():
                self.audit.write(
                    "node", status="failed", reason="thread-crash-loop", detail=event.why
                )

    def _image(self, image: Image, status: str, **fields: object) -> None:
        self.audit.write(
            "received",
            calling_ae=image.calling_ae,
            peer=image.peer,
            sop_instance_uid=image.sop_instance_uid or None,
            study_instance_uid=image.study_instance_uid,
            sop_class_uid=image.sop_class_uid,
            status=status,
            timings_ms={k: round(1000 * v, 1) for k, v in image.timings.items()},
            **fields,
        )


class Counters:
    """Outcomes as Prometheus counters and histograms (:mod:`pacs_node.metrics`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, event: Event) -> None:
        metrics = self.metrics
        match event:
            case Processed(prediction=prediction):
                if event.image.received is not None:
                    metrics.observe(
                        "processing_seconds", max(0.0, time.time() - event.image.received)
                    )
                outcome = (
                    "not-assessed"
                    if not prediction.assessed
                    else "positive"
                    if prediction.positive
                    else "negative"
                )
                metrics.inc("processed", outcome=outcome)
                if prediction.triage:
                    metrics.inc("triage_flags")
                if not prediction.assessed:
                    metrics.inc("out_of_distribution")
            case Skipped():
                metrics.inc("skipped", reason=event.reason)
            case Failed():
                metrics.inc("failed", reason=event.reason)
            case Retried():
                metrics.inc("retries", reason=event.reason)
            case Inferred():
                metrics.observe("inference_seconds", event.seconds)
            case Delivered(reason=None):
                metrics.inc("delivered", destination=str(event.destination))
            case Delivered():
                metrics.inc(
                    "dead_letters", destination=str(event.destination), reason=event.reason or ""
                )
            case Held(reason=str() as reason):
                metrics.inc("delivery_holds", destination=str(event.destination), reason=reason)
            case Sent():
                metrics.observe("delivery_seconds", event.seconds)
            case ProtocolError():
                metrics.inc("protocol_errors")


class LogLines:
    """Outcomes as log lines: one per image, UIDs and codes only (:mod:`pacs_node.logs`)."""

    def __call__(self, event: Event) -> None:
        match event:
            case Processed(image=image, prediction=prediction):
                said = (
                    f"{prediction.label}, pneumonia {100 * prediction.pneumonia_probability:.0f}%"
                    if prediction.assessed
                    else "not assessed (outside the training distribution)"
                )
                logger.info(
                    "%s: %s%s, %d region(s), %.0f ms; %s",
                    image.sop_instance_uid,
                    said,
                    ", TRIAGE" if prediction.triage else "",
                    len(prediction.boxes),
                    1000 * image.timings.get("total", 0.0),
                    event.delivery,
                )
            case Skipped():
                logger.info(
                    "%s: no result: %s (%s)",
                    event.image.sop_instance_uid,
                    event.reason,
                    event.detail,
                )
            case Failed(deaths=0):
                logger.error(
                    "%s: failed (%s): %s; kept in %s",
                    event.image.sop_instance_uid,
                    event.reason,
                    event.detail,
                    event.folder,
                )
            case Failed():
                who = event.image.sop_instance_uid or "an instance without a receipt"
                logger.error(
                    "%s was in flight, alone, at %d deaths of the node; moved to %s",
                    who,
                    event.deaths,
                    event.folder,
                )
            case Retried():
                logger.warning(
                    "%s: %s (%s); tried again in %.0f s",
                    event.image.sop_instance_uid,
                    event.reason,
                    event.why,
                    event.delay,
                )
            case NodeFailed():
                logger.critical(
                    "%s: the node stops taking images; its service manager should restart it",
                    event.why,
                )


__all__ = [
    "AuditTrail",
    "Counters",
    "Delivered",
    "Event",
    "Failed",
    "FailReason",
    "Held",
    "Image",
    "Inferred",
    "LogLines",
    "NodeFailed",
    "Outcomes",
    "Processed",
    "ProtocolError",
    "Retried",
    "Sent",
    "Skipped",
    "result_summary",
]
