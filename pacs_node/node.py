"""The DICOM node: receive, keep, read, report, send back.

Threads and what they own:

* association threads (pynetdicom): :meth:`Node.handle_store` only checks the request,
  writes the bytes durably into the spool and enqueues the path. No decoding, no model.
* one worker: takes up to ``batch_size`` waiting instances, screens and decodes them,
  runs the model once for the batch, builds the SR and the SC, puts them durably in
  every destination's outbox (or ``output_dir``), then lets the spool forget the source.
* one sender per destination (:mod:`pacs_node.outbox`).
* the metrics endpoint (:mod:`pacs_node.metrics`).

Start-up re-queues every instance still in the spool, so after a crash (``kill -9``
included) nothing acknowledged is lost; result UIDs are deterministic, so an instance
processed twice yields the same two objects, not four.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    Verification,
)

from dp_transforms import ImageError

from .audit import AuditLog
from .config import NodeConfig
from .identity import ResultIdentity
from .metrics import Metrics, MetricsServer
from .outbox import DestinationSender
from .overlay import build_overlay
from .predictor import NodePredictor, Prepared, prepare
from .report import build_report
from .screen import screen
from .spool import Spool, atomic_file
from .status import StoreStatus

logger = logging.getLogger(__name__)

#: An instance in flight at this many deaths of the process (a decoder that segfaults on it,
#: say) is moved to spool/failed instead of being tried at every start.
MAX_STARTS = 3

#: The chest radiograph storage classes the node reads (PS3.4 B.5); nothing else is offered,
#: so a sender of anything else sees its presentation context rejected.
STORAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing)
#: Transfer syntaxes accepted; each has a pixel decoder installed (pylibjpeg and plugins).
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
)  # fmt: skip


@dataclass
class Item:
    """One received instance on its way through the worker."""

    path: Path
    started: float = field(default_factory=time.perf_counter)
    dataset: Dataset | None = None
    prepared: Prepared | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Node:
    """A running node; :meth:`start` it, :meth:`stop` it (also used by the tests)."""

    def __init__(self, config: NodeConfig, predictor: NodePredictor | None = None) -> None:
        self.config = config
        self.spool = Spool(config.spool, config.keep_skipped)
        self.audit = AuditLog(config.audit_path)
        self.metrics = Metrics()
        self.predictor = predictor or NodePredictor(config.bundle, config.device, config.operating_point, config.heatmap_stage)
        self.queue: queue.Queue[Path] = queue.Queue()
        self.output_dir = Path(config.output_dir)
        client_tls = _client_tls(config) if config.tls.send else None
        outbox = Path(config.spool).parent / "outbox"
        self.senders = [
            DestinationSender(d, outbox, config.ae_title, config.outbox, self._delivered, client_tls, config.network_timeout_s)
            for d in config.parsed_destinations()
        ]
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="worker", daemon=True)
        self._server = None
        self._http: MetricsServer | None = None
        self._register_gauges()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue the spool, start the worker, senders, metrics endpoint and the listener."""
        for path, starts in self.spool.quarantine(MAX_STARTS):
            logger.error("%s was being processed at %d crashes of the node; moved to %s", path.stem, starts, path.parent)
            self.metrics.inc("failed_total")
            self.audit.write("received", sop_instance_uid=path.stem, status="failed", detail=f"in flight at {starts} crashes of the node; quarantined")
        pending = self.spool.pending()
        for path in pending:
            self.queue.put(path)
        if pending:
            logger.info("%d instance(s) from before the last stop are queued again", len(pending))
        for sender in self.senders:
            sender.start()
        self._worker.start()
        if self.config.metrics_port >= 0:
            self._http = MetricsServer(self.config.metrics_host, self.config.metrics_port, self.metrics, self.health)
            self._http.start()
        self._server = self._make_ae().start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, self.handle_echo)],
            ssl_context=_server_tls(self.config) if self.config.tls.listening else None,
        )
        logger.info("%s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish the batch in flight, leave the rest in the spool and outboxes."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        self._worker.join(timeout)
        for sender in self.senders:
            sender.stop()
        if self._http is not None:
            self._http.stop()
        self.audit.close()
        logger.info("stopped; %d instance(s) left in the spool for the next start", self.spool.count())

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.config.port

    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http else None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.maximum_associations = self.config.max_associations
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.network_timeout = self.config.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allow)
        return ae

    # --- association threads ---------------------------------------------------------------------

    def handle_echo(self, event: evt.Event) -> int:
        return StoreStatus.SUCCESS

    def handle_store(self, event: evt.Event) -> int:
        """PS3.4 B.2.3: success only once the instance is durable in the spool."""
        calling = str(event.assoc.requestor.ae_title).strip()
        if self._stopping.is_set():
            return self._refuse(StoreStatus.SHUTTING_DOWN, "shutting-down", calling)
        if self.queue.qsize() >= self.config.max_queue:
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, "queue-full", calling)
        if self.spool.free_bytes() < self.config.min_free_mb * 2**20:
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, "disk-full", calling)
        stream = event.encoded_dataset(include_meta=False)
        problem = _check_header(stream, event)
        if problem is not None:
            return self._refuse(problem[0], problem[1], calling)
        meta = event.file_meta
        meta.SendingApplicationEntityTitle = calling
        meta.ReceivingApplicationEntityTitle = self.config.ae_title
        try:
            path = self.spool.store(meta, stream)
        except OSError as exc:  # a full or failing disk: the sender keeps the image and retries
            logger.error("spool write failed: %s", exc)
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, "spool-write", calling)
        self.queue.put(path)
        self.metrics.inc("received_total")
        return StoreStatus.SUCCESS

    def _refuse(self, status: StoreStatus, reason: str, calling: str) -> int:
        self.metrics.inc("refused_total", reason=reason)
        logger.warning("C-STORE from %s refused: %s (0x%04X)", calling, reason, status)
        return status

    # --- worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = [self.queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < self.config.batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self.process([Item(path) for path in batch])

    def process(self, items: list[Item]) -> None:
        """Screen, decode, infer (one batch), write and hand over the results of ``items``."""
        paths = [item.path for item in items]
        self.spool.begin(paths)
        try:
            self._process(items)
        finally:
            self.spool.end(paths)

    def _process(self, items: list[Item]) -> None:
        ready = [item for item in items if self._load(item)]
        if not ready:
            return
        start = time.perf_counter()
        try:
            predictions = self.predictor.predict([item.prepared for item in ready])
        except Exception as exc:  # noqa: BLE001 - keep every image, record why, keep serving
            logger.exception("inference failed for a batch of %d", len(ready))
            for item in ready:
                self._fail(item, f"inference failed: {exc}")
            return
        seconds = time.perf_counter() - start
        self.metrics.observe("inference_seconds", seconds)
        for item, prediction in zip(ready, predictions):
            item.timings["inference"] = seconds / len(ready)
            try:
                self._finish(item, prediction)
            except Exception as exc:  # noqa: BLE001
                logger.exception("writing the results of %s failed", item.path.name)
                self._fail(item, f"writing results failed: {exc}")

    def _load(self, item: Item) -> bool:
        """Read, screen and decode; False (and recorded) when the item gets no result."""
        t0 = time.perf_counter()
        try:
            item.dataset = dcmread(item.path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            return self._skip(item, "unreadable", f"not a readable DICOM file ({exc})")
        skipped = screen(item.dataset)
        if skipped is not None:
            return self._skip(item, skipped[0].value, skipped[1])
        try:
            item.prepared = prepare(item.dataset, self.predictor.contract.image_size)
        except ImageError as exc:
            return self._skip(item, exc.reason.value, exc.detail)
        item.timings["decode"] = time.perf_counter() - t0
        return True

    def _finish(self, item: Item, prediction) -> None:
        t0 = time.perf_counter()
        source, model = item.dataset, self.predictor.contract
        identity = ResultIdentity.of(source, model)
        chest = item.prepared.source
        report = build_report(source, prediction, model, identity)
        overlay = build_overlay(source, chest.pixels, chest.spacing, prediction, model, identity, self.config.overlay_max_side)
        item.timings["build"] = time.perf_counter() - t0
        delivery = self._hand_over(source, [report, overlay])
        self.spool.done(item.path)
        item.timings["total"] = time.perf_counter() - item.started
        result = {
            "label": prediction.label, "positive": prediction.positive, "pneumonia_probability": round(prediction.pneumonia_probability, 4),
            "regions": len(prediction.boxes), "model": model.name, "model_version": model.version,
        }  # fmt: skip
        self.metrics.inc("processed_total", outcome="positive" if prediction.positive else "negative")
        logger.info(
            "%s: %s, pneumonia %.0f%%, %d region(s), %.0f ms; %s",
            source.SOPInstanceUID, prediction.label, 100 * prediction.pneumonia_probability, len(prediction.boxes), 1000 * item.timings["total"], delivery,
        )
        self._audit(item, "processed", result=result, outputs=[identity.sr_uid, identity.sc_uid], delivery=delivery)

    def _hand_over(self, source: Dataset, results: list[Dataset]) -> str:
        """Results into every outbox, durably; with no destination, into ``output_dir``."""
        if not self.senders:
            folder = self.output_dir / str(source.StudyInstanceUID)
            folder.mkdir(parents=True, exist_ok=True)
            for dataset in results:
                with atomic_file(folder / f"{dataset.Modality}.{dataset.SOPInstanceUID}.dcm") as handle:
                    dataset.save_as(handle, enforce_file_format=True)
            return f"written to {folder}"
        for sender in self.senders:
            for dataset in results:
                sender.put(dataset, str(source.SOPInstanceUID))
            sender.wake()
        return "queued for " + ", ".join(str(s.destination) for s in self.senders)

    def _skip(self, item: Item, reason: str, detail: str) -> bool:
        self.spool.skip(item.path)
        self.metrics.inc("skipped_total", reason=reason)
        logger.info("%s: no result: %s (%s)", item.path.stem, reason, detail)
        self._audit(item, "skipped", skip_reason=reason, detail=detail)
        return False

    def _fail(self, item: Item, detail: str) -> None:
        self.spool.fail(item.path)
        self.metrics.inc("failed_total")
        self._audit(item, "failed", detail=detail)

    def _audit(self, item: Item, status: str, **fields) -> None:
        ds = item.dataset
        meta = getattr(ds, "file_meta", None)
        self.audit.write(
            "received",
            calling_ae=str(meta.get("SendingApplicationEntityTitle", "")).strip() if meta is not None else None,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")) if ds is not None else item.path.stem,
            study_instance_uid=str(ds.get("StudyInstanceUID", "")) if ds is not None else None,
            sop_class_uid=str(ds.get("SOPClassUID", "")) if ds is not None else None,
            status=status,
            timings_ms={k: round(1000 * v, 1) for k, v in item.timings.items()},
            **fields,
        )

    def _delivered(self, destination, sop_uid: str, source_uid: str, ok: bool) -> None:
        self.metrics.inc("delivered_total" if ok else "dead_letters_total", destination=str(destination))
        self.audit.write("delivery", sop_instance_uid=source_uid, outputs=[sop_uid], destination=str(destination), status="delivered" if ok else "dead-letter")

    # --- health --------------------------------------------------------------------------------------

    def health(self) -> dict:
        disk_ok = self.spool.free_bytes() >= self.config.min_free_mb * 2**20
        ok = self._worker.is_alive() and disk_ok and not self._stopping.is_set()
        return {
            "status": "ok" if ok else "degraded", "worker_alive": self._worker.is_alive(), "disk_ok": disk_ok,
            "queue": self.queue.qsize(), "model": self.predictor.contract.name, "model_version": self.predictor.contract.version,
            "destinations": {str(s.destination): {"backlog": s.stats.backlog, "last_error": s.stats.last_error} for s in self.senders},
        }  # fmt: skip

    def _register_gauges(self) -> None:
        self.metrics.gauge("queue_depth", lambda: {(): float(self.queue.qsize())}, "instances waiting for the model")
        self.metrics.gauge(
            "outbox_backlog", lambda: {(("destination", str(s.destination)),): float(s.stats.backlog) for s in self.senders}, "results waiting to be sent"
        )


def _check_header(stream: bytes, event: evt.Event) -> tuple[StoreStatus, str] | None:
    """Refuse what is not parseable or not of the negotiated SOP class (PS3.4 B.2.3)."""
    try:
        header = dcmread(BytesIO(stream), force=True, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        sop_class = str(header.get("SOPClassUID", ""))
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse gets the same status
        return StoreStatus.CANNOT_UNDERSTAND, "unparseable"
    if sop_class != str(event.context.abstract_syntax):
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "sop-class-mismatch"
    return None


def _server_tls(config: NodeConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    if config.tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=config.tls.ca or None)
    return context


def _client_tls(config: NodeConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls.ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls.cert:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    return context
