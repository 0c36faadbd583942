"""The DICOM node: receive, keep, read, report, send back, and never stop doing so.

This module is the wiring; each part lives in its own:

* intake (:mod:`pacs_node.intake`): the listener's association threads check, spool and
  enqueue; no decoding, no model;
* the worker (:mod:`pacs_node.pipeline`): read, decode, infer, write every output kind,
  hand over; one outcome event per image;
* delivery (:mod:`pacs_node.delivery`): one sender thread per destination;
* the outcome events (:mod:`pacs_node.outcomes`): the audit trail, the metrics and the log
  subscribe to what the pipeline and the senders emit;
* the supervisor (:mod:`pacs_node.supervisor`): restarts, retention, health, gauges;
* the metrics endpoint (:mod:`pacs_node.metrics`).

The promise: an image the node acknowledged gets its results or a recorded reason,
whatever the image, the peers or the machine do (:mod:`pacs_node.pipeline` says how).
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

from pacs_node import dimse_reactor, logs
from pacs_node.audit import AuditLog, safe_uid
from pacs_node.config import Destination, NodeConfig, WebDestination, is_loopback
from pacs_node.delivery.outbox import DestinationSender
from pacs_node.delivery.registry import check_outputs
from pacs_node.drift import Watch
from pacs_node.intake.listener import Listener, Refusal, client_tls, server_tls
from pacs_node.intake.shared import SharedSpool, node_name, open_spool
from pacs_node.metrics import Metrics, MetricsServer
from pacs_node.model.predictor import NodePredictor
from pacs_node.outcomes import (
    AuditTrail,
    Counters,
    Delivered,
    Held,
    LogLines,
    Outcomes,
    ProtocolError,
    Sent,
)
from pacs_node.pipeline import Pipeline
from pacs_node.scale.ledger import DeliveryLedger
from pacs_node.status import StoreStatus
from pacs_node.supervisor import Supervisor

logger = logging.getLogger(__name__)


class Node:
    """A running node; :meth:`start` it, :meth:`stop` it (also used by the tests).

    Attributes:
        outcomes: what became of every image and delivery; subscribe to hear it.
    """

    def __init__(self, config: NodeConfig, predictor: NodePredictor | None = None) -> None:
        self._protocol = logs.install()
        self.config = config
        writers = check_outputs(config)
        self.spool = open_spool(config)
        shared = self.spool if isinstance(self.spool, SharedSpool) else None
        self.audit = AuditLog(config.audit_path, node_name(config.scale) if shared else "")
        self.metrics = Metrics()
        self.predictor = predictor or NodePredictor(
            config.bundle,
            device=config.device,
            engine=config.engine,
            operating_point=config.operating_point,
            heatmap_stage=config.heatmap_stage,
            ood_gate=config.ood_gate,
        )
        self.watch = Watch.of_bundle(
            self.metrics, config.bundle, self.predictor.contract, config.drift_window
        )
        self.outcomes = Outcomes(
            AuditTrail(self.audit), Counters(self.metrics), LogLines(), self.watch
        )
        outbox = Path(config.spool).parent / "outbox"
        self.senders = [
            DestinationSender(
                d,
                outbox,
                calling_ae=config.ae_title,
                config=config.outbox,
                on_delivered=self._delivered,
                tls=_sending_tls(config, d),
                timeout_s=config.network_timeout_s,
                on_sent=lambda seconds: self.outcomes.emit(Sent(seconds=seconds)),
                on_held=lambda *held: self.outcomes.emit(
                    Held(destination=held[0], reason=held[1], detail=held[2])
                ),
                ledger=DeliveryLedger(
                    config.scale.database, shared.owner, 2 * config.network_timeout_s
                )
                if shared
                else None,
            )
            for d in config.parsed_destinations()
        ]
        self._stopping, prune_due = threading.Event(), threading.Event()
        self.pipeline = Pipeline(
            config=config,
            spool=self.spool,
            predictor=self.predictor,
            writers=writers,
            senders=self.senders,
            outcomes=self.outcomes,
            prune_due=prune_due,
        )
        self.listener = Listener(
            config,
            spool=self.spool,
            audit=self.audit,
            metrics=self.metrics,
            gate=self._gate,
            enqueue=shared.wake if shared else self.pipeline.work.put,
        )
        self.supervisor = Supervisor(
            config=config,
            pipeline=self.pipeline,
            listener=self.listener,
            senders=self.senders,
            spool=self.spool,
            audit=self.audit,
            metrics=self.metrics,
            outcomes=self.outcomes,
            stopping=self._stopping,
            prune_due=prune_due,
            model=(self.predictor.contract.name, self.predictor.contract.version),
        )
        self._http: MetricsServer | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue the spool, start the worker, senders, supervisor, metrics endpoint and the listener."""
        dimse_reactor.install()  # associations wait for work instead of polling (before any is built)
        self.supervisor.prune()
        self.pipeline.resume()
        self._protocol.listeners.append(self._protocol_error)
        for sender in self.senders:
            sender.start()
        if isinstance(self.spool, SharedSpool):
            self.spool.start(self.pipeline.work, self.senders)
        self.supervisor.start_worker()
        if self.config.metrics_port >= 0:
            self._http = MetricsServer(
                self.config.metrics_host,
                self.config.metrics_port,
                self.metrics,
                self.health,
                self.config.http_timeout_s,
                self.config.http_max_connections,
                self.ready,
            )
            self._http.start()
        self.listener.start(server_tls(self.config) if self.config.tls.listening else None)
        self.supervisor.start()
        self._announce_exposure()
        logger.info("%s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish the batch in flight, leave the rest in the spool and outboxes."""
        self._stopping.set()
        self.listener.stop()
        self.supervisor.stop_worker(timeout)
        for sender in self.senders:
            sender.stop()
        if self._http is not None:
            self._http.stop()
        if self._protocol_error in self._protocol.listeners:
            self._protocol.listeners.remove(self._protocol_error)
        self.audit.close()
        logger.info(
            "stopped; %d instance(s) left in the spool for the next start", self.spool.count()
        )
        self.spool.close()

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http else None

    @property
    def fatal(self) -> str | None:
        """Why the node gave up (a thread kept dying), or None."""
        return self.supervisor.fatal

    @property
    def failed(self) -> threading.Event:
        """Set when the node gave up; ``dp-node`` then exits non-zero for its service manager."""
        return self.supervisor.failed

    def health(self) -> dict[str, object]:
        """What ``/health`` answers (:meth:`pacs_node.supervisor.Supervisor.health`)."""
        return self.supervisor.health()

    def ready(self) -> str | None:
        """Why the node takes no image now, or None when it does (``/ready``)."""
        refusal = self._gate()
        if refusal is not None:
            return refusal.reason
        if not self.listener.alive:
            return "the DICOM listener is not running"
        return "; ".join(self.spool.problems()) or None

    def _announce_exposure(self) -> None:
        """Say at start what an operator must know about who can reach the node."""
        if self.config.allow_any_caller:
            logger.warning(
                "OPEN NODE: any calling AE title is accepted (allow_any_caller: true); name the callers in allow"
            )
        if any(network.prefixlen == 0 for network in self.config.networks()):
            logger.warning(
                "connections are accepted from any address (allow_networks holds a /0 network)"
            )
        if not self.config.tls.listening and not is_loopback(self.config.host):
            logger.warning(
                "DICOM traffic to %s:%d travels in cleartext: patient data is readable on the network (configure tls)",
                self.config.host,
                self.port,
            )
        if self._http is not None and not is_loopback(self.config.metrics_host):
            logger.warning(
                "/health and /metrics are served to the network on %s:%d, without authentication (metrics_host); they name destinations and counts, never patient data",
                self.config.metrics_host,
                self.metrics_port,
            )
        for sender in self.senders:
            if isinstance(sender.destination, WebDestination) and sender.destination.cleartext:
                logger.warning(
                    "results to %s travel in cleartext: patient data is readable on the network (use https://)",
                    sender.destination,
                )

    # --- the association threads' view of the node ----------------------------------------------------

    def _gate(self) -> Refusal | None:
        """Whether an instance can be taken now (PS3.4 B.2.3: 0xA7xx tells the sender to retry)."""
        if self._stopping.is_set():
            return Refusal(StoreStatus.SHUTTING_DOWN, "shutting-down")
        if self.fatal:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "node-failed")
        if max(self.pipeline.work.qsize(), self.spool.backlog()) >= self.config.max_queue:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "queue-full")
        if self.spool.free_bytes() < self.config.min_free_mb * 2**20:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "disk-full")
        return None

    # --- what the senders and the protocol layer report --------------------------------------------------

    def _delivered(
        self,
        destination: Destination | WebDestination,
        uid: str,
        source_uid: str,
        reason: str | None,
    ) -> None:
        self.outcomes.emit(
            Delivered(
                destination=destination, uid=uid, source_uid=safe_uid(source_uid), reason=reason
            )
        )

    def _protocol_error(self) -> None:
        self.outcomes.emit(ProtocolError())


def _sending_tls(
    config: NodeConfig, destination: Destination | WebDestination
) -> ssl.SSLContext | None:
    """The client TLS context for one destination: https:// always, C-STORE with ``tls.send``."""
    if config.tls.send or (isinstance(destination, WebDestination) and destination.https):
        return client_tls(config)
    return None
