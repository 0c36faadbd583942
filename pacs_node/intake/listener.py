"""Receiving: the DICOM listener, what it accepts, and every refusal made visible.

The association threads only check, spool and enqueue (:meth:`Listener.handle_store`):
no decoding, no model. Data sets are received in chunks straight into the spool's
``tmp/`` folder (pynetdicom's chunked receive), so an image never sits whole in memory
on its way in, and a data set that grows past ``max_dataset_mb`` is cut off while it
arrives. What no peer can do, and how:

* hold a connection slot without negotiating: a connection that has not completed its
  TLS handshake and A-ASSOCIATE-RQ within ``handshake_timeout_s`` is cut (the handshake
  runs in the connection's own thread, never in the accept loop);
* make the node hold a huge PDU: a PDU announcing more than :data:`MAX_PDU_BYTES` is
  refused before it is read;
* hold a slot by going silent: an association with no DIMSE activity for
  ``idle_timeout_s`` is aborted, and while fewer than ``reserved_associations`` slots are
  free, those idle for ``reclaim_idle_s`` are reclaimed, the longest idle first (a request
  that finds no slot free takes one so at once);
* hold a slot or a thread by trickling: a PDU, or a DIMSE message, under way must arrive at
  ``min_receive_kb_s`` on average after ``receive_grace_s``, or its connection is cut
  (:class:`BoundedSocket` bounds every read; the sweeper checks every message);
* connect from elsewhere than ``allow_networks``; hold more than
  ``max_associations_per_host`` associations from one address, or the reserved slots while
  holding half of that (an A-ASSOCIATE-RJ, rejected-transient, local limit exceeded:
  PS3.8 9.3.4, "busy, try later"); open connections past a hard cap well above those
  limits (:data:`FLOOD_FACTOR`; closed at once, a flood);
* send a data set that is not what the command says (SOP Class and Instance UIDs), or
  a deflated one that inflates past the size cap.

Each rejected association, refused presentation context, refused C-STORE and cut
connection gets an audit line (calling AE title, peer address, reason code; no patient
data) and a counter. :meth:`Listener.problems` tells ``/health`` when every slot is in use,
when the accept loop or the sweeper is not running, and when associations keep ending on
an internal error of the node's own.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import queue
import select
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, dimse_messages, dsutils, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated into the module at import, invisible to a checker
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from pacs_node.audit import AuditLog, Bursts, safe_uid
from pacs_node.config import MAX_PDU_BYTES, NodeConfig
from pacs_node.dimse_reactor import PromptSocket
from pacs_node.files import atomic_file, is_transient
from pacs_node.intake.spool import Receipt, Spool
from pacs_node.logs import Throttle, describe
from pacs_node.metrics import Metrics
from pacs_node.status import StoreStatus
from pacs_node.uids import derived_uid

#: What ``socketserver`` hands a server's methods: a stream server's connection is a socket; the
#: tuple is a datagram server's, which the listener never runs.
_Request = socket.socket | tuple[bytes, socket.socket]

logger = logging.getLogger(__name__)

#: The storage classes the node reads (PS3.4 B.5); nothing else is offered, so a sender of
#: anything else sees its presentation context rejected. Secondary Capture is read when its
#: Modality says it is a radiograph (the RSNA challenge files are stored so).
STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
#: Transfer syntaxes accepted; each has a pixel decoder installed (pylibjpeg and plugins), and
#: a deflated data set is inflated (within the size cap) before it is acknowledged.
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
#: Room for command sets and PDU headers beside the data set itself.
OVERHEAD_BYTES = 2**20
#: The spool's free space is checked while a data set arrives, every this many bytes.
DISK_CHECK_BYTES = 2**20
#: Files in spool/tmp untouched this long belong to no arrival or write in progress.
STALE_TMP_S = 600.0
#: (result, source, diagnostic) of A-ASSOCIATE-RJ (PS3.8 9.3.4) -> the reason recorded.
REJECTIONS: dict[tuple[int, int | None, int | None], str] = {
    (1, 1, 3): "calling-ae",
    (1, 1, 7): "called-ae",
    (2, 3, 2): "limit",
    (2, 2, 1): "user-identity",
    (1, 1, 2): "application-context",
}
#: A-ASSOCIATE-RJ for a slot limit: rejected-transient, service-provider (presentation), local
#: limit exceeded (PS3.8 9.3.4): the sender retries later instead of reporting a network failure.
TRANSIENT_LIMIT = (0x02, 0x03, 0x02)
#: Open TCP connections are closed at accept past this many times the association limits (all
#: connections, and those from one address): a flood, not a sender to answer politely.
FLOOD_FACTOR = 4
#: A connection the node is ending has this long to go after its A-ABORT; then its socket is cut
#: (a connection thread blocked in a read never sends the A-ABORT).
ABORT_GRACE_S = 0.5
#: /health reports associations ending on an internal error when this many in a row do.
CRASH_RUN = 3
#: A C-ECHO whose handler failed: processing failure (PS3.7 C.4, a general status).
ECHO_FAILURE = 0x0110


@dataclass(frozen=True)
class Refusal:
    """A C-STORE refused: the status (PS3.4 B.2.3) and a stable reason code."""

    status: StoreStatus
    reason: str


class TooLarge(Exception):
    """A data set (or its inflated form) is larger than ``max_dataset_mb``."""


class Unparseable(Exception):
    """A data set whose encoding itself is broken (a deflate stream that does not inflate)."""


@dataclass(kw_only=True)
class Connection:
    """One TCP connection, from accept to close."""

    sock: socket.socket
    peer: str
    opened: float
    assoc: Association | None = None
    negotiated: bool = False
    cut: bool = False
    refused: str = ""  # why the node turned the association request away itself
    receiving: int = 0  # bytes of the data set now arriving
    since_disk_check: int = 0
    cut_arriving: str = ""  # why a data set was cut off as it arrived: "too-large" or "disk-full"
    admitted: bool = False  # holds one of the max_associations slots
    active: float = 0.0  # last DIMSE activity: accepted, a PDU received, a handler run
    # bytes the message now arriving may fall behind the minimum rate, at allowance_at
    allowance: float = 0.0
    allowance_at: float = 0.0
    serving: int = 0  # handlers running now
    ending: str = ""  # why the node is ending it (its slot is free again)
    end_by: float = float("inf")  # its socket is cut then if still open
    served: int = 0  # requests answered with success
    internal_error: str = ""  # the last internal error of the node's own on it (describe())

    def idle(self, now: float) -> float:
        """Seconds without DIMSE activity; 0 while a message arrives or a handler runs."""
        return 0.0 if self.serving or self.receiving else now - self.active

    def took(self, nbytes: int, now: float, grace_s: float, bytes_per_s: float) -> None:
        """A PDU of the message now arriving: its bytes refill the allowance, up to ``grace_s`` worth.

        A token bucket: the allowance drains at ``bytes_per_s`` and what arrives refills it, so a
        message may pause at most ``grace_s`` and must average ``bytes_per_s`` over any stretch;
        bytes sent early buy no later silence beyond the grace.
        """
        full = grace_s * bytes_per_s
        left = (
            full if not self.receiving else self.allowance - (now - self.allowance_at) * bytes_per_s
        )
        self.allowance, self.allowance_at = min(full, left + nbytes), now
        self.receiving += nbytes

    def too_slow(self, now: float, bytes_per_s: float) -> bool:
        """Whether the message under way has used up its allowance (see :meth:`took`)."""
        return self.receiving > 0 and self.allowance - (now - self.allowance_at) * bytes_per_s < 0


def slot_refusal(held: int, held_by_host: int, config: NodeConfig) -> str | None:
    """Why an association request cannot have a slot now (None: it can).

    ``held`` slots are in use, ``held_by_host`` of them by the requesting address. The last
    ``reserved_slots`` go only to addresses holding fewer than half their per-host limit,
    so that a few addresses (a crowd of idle peers) cannot take every slot.
    """
    if held_by_host >= config.max_associations_per_host:
        return "per-host-limit"
    if held >= config.max_associations:
        return "limit"
    if (
        held >= config.max_associations - config.reserved_slots
        and 2 * held_by_host >= config.max_associations_per_host
    ):
        return "reserved-slots"
    return None


class Connections:
    """The open connections, for per-host limits, handshake deadlines and size caps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Connection] = []

    def add(self, sock: socket.socket, peer: str) -> Connection:
        connection = Connection(sock=sock, peer=peer, opened=time.monotonic())
        with self._lock:
            self._open.append(connection)
        return connection

    def attach(self, assoc: Association) -> Connection | None:
        """Bind an association to the connection of its socket."""
        raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        with self._lock:
            for connection in self._open:
                if connection.sock is raw:
                    connection.assoc = assoc
                    return connection
        return None

    def of(self, assoc: Association) -> Connection | None:
        with self._lock:
            return next((c for c in self._open if c.assoc is assoc), None)

    def by_socket(self, sock: socket.socket) -> Connection | None:
        with self._lock:
            return next((c for c in self._open if c.sock is sock), None)

    def remove(self, connection: Connection | None) -> bool:
        """Forget a connection; True the first time (the caller records how it ended)."""
        with self._lock:
            if connection in self._open:
                self._open.remove(connection)
                return True
            return False

    def from_host(self, peer: str) -> int:
        with self._lock:
            return sum(1 for c in self._open if c.peer == peer)

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def held(self) -> int:
        """Association slots in use."""
        with self._lock:
            return self._held()

    def _held(self, peer: str | None = None) -> int:
        return sum(
            1
            for c in self._open
            if c.admitted and not c.ending and (peer is None or c.peer == peer)
        )

    def claim(
        self, connection: Connection, config: NodeConfig
    ) -> tuple[str | None, Connection | None]:
        """A slot for ``connection`` (refusal None), or why not; with the connection reclaimed for
        it, when every slot was in use and one had been idle for ``reclaim_idle_s``."""
        now, victim = time.monotonic(), None
        with self._lock:
            held, by_host = self._held(), self._held(connection.peer)
            refusal = slot_refusal(held, by_host, config)
            if refusal == "limit" and slot_refusal(held - 1, by_host, config) is None:
                victim = next(iter(self._idlest(now, config.reclaim_idle_s)), None)
                if victim is not None:
                    self._end(victim, "reclaimed", now)
                    refusal = None
            if refusal is None:
                connection.admitted, connection.active = True, now
            return refusal, victim

    def _idlest(self, now: float, at_least: float) -> list[Connection]:
        idle = [
            c
            for c in self._open
            if c.admitted and not c.ending and c.idle(now) >= at_least and not _unread(c.sock)
        ]
        return sorted(idle, key=lambda c: -c.idle(now))

    def end(self, connection: Connection, reason: str) -> bool:
        """Mark a connection as being ended by the node; True the first time."""
        with self._lock:
            return self._end(connection, reason, time.monotonic())

    def _end(self, connection: Connection, reason: str, now: float) -> bool:
        if connection.ending:
            return False
        connection.ending, connection.end_by = reason, now + ABORT_GRACE_S
        return True

    def due(self, config: NodeConfig) -> list[tuple[Connection, str]]:
        """The associations to end now, and why: idle past ``idle_timeout_s``, a message arriving
        too slowly, and (while fewer than the reserved slots are free) the idlest past ``reclaim_idle_s``."""
        now, found = time.monotonic(), []
        rate = config.min_receive_kb_s * 1000
        with self._lock:
            for connection in self._open:
                if not connection.admitted or connection.ending or _unread(connection.sock):
                    continue
                if connection.too_slow(now, rate):
                    found.append((connection, "slow-transfer"))
                elif connection.idle(now) > config.idle_timeout_s:
                    found.append((connection, "idle-timeout"))
            short = config.reserved_slots - (config.max_associations - self._held() + len(found))
            chosen = {id(c) for c, _ in found}
            found += [
                (c, "reclaimed")
                for c in self._idlest(now, config.reclaim_idle_s)
                if id(c) not in chosen
            ][: max(short, 0)]
            for connection, reason in found:
                self._end(connection, reason, now)
        return found

    def overdue_ends(self) -> list[Connection]:
        """Connections still open past their ``end_by`` (each once)."""
        now = time.monotonic()
        with self._lock:
            late = [c for c in self._open if c.end_by < now]
            for connection in late:
                connection.end_by = float("inf")
        return late

    def sweep(self, seconds: float) -> tuple[list[Connection], list[Connection]]:
        """Forget closed connections; return those that never negotiated and are still open after
        ``seconds`` (each once), and those that closed before negotiating."""
        now, overdue, closed = time.monotonic(), [], []
        with self._lock:
            for connection in list(self._open):
                if not _is_open(connection.sock):
                    closed.append(connection)
                elif (
                    not connection.negotiated
                    and not connection.cut
                    and now - connection.opened > seconds
                ):
                    connection.cut = True
                    overdue.append(connection)
            self._open = [c for c in self._open if c not in closed]
        return overdue, closed


def _unread(sock: socket.socket) -> bool:
    """Whether bytes wait on ``sock`` that the node has not read yet (then any delay is the node's)."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _is_open(sock: socket.socket) -> bool:
    try:
        return sock.fileno() >= 0
    except (OSError, ValueError):
        return False


def _discard_partial(assoc: Association | None) -> None:
    """Remove the files of data sets that arrived but will never be served (never acknowledged):
    the one cut off while arriving, and those queued behind the store in progress when the
    association ended."""
    dimse = getattr(assoc, "dimse", None)
    files = [getattr(getattr(dimse, "message", None), "_data_set_file", None)]
    waiting = getattr(dimse, "msg_queue", None)
    while waiting is not None:
        try:
            files.append(getattr(waiting.get_nowait()[1], "_dataset_file", None))
        except queue.Empty:
            break
    for handle in filter(None, files):
        with contextlib.suppress(OSError):
            handle.close()
        Path(handle.name).unlink(missing_ok=True)


def _release_slot(assoc: Association | None) -> None:
    """End an acceptor's wait for an A-ASSOCIATE-RQ that will never come."""
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if queue is not None:
        queue.put(None)


def cut(sock: socket.socket) -> None:
    """End a connection from any thread: a recv blocked on it returns at once."""
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)


class BoundedSocket(PromptSocket):
    """The node's association socket (acknowledging at once), refusing to read a PDU larger than :data:`MAX_PDU_BYTES`,
    and giving every read a deadline.

    pynetdicom reads a PDU's header, then its body, each with a blocking loop whose socket
    timeout starts again with every byte: a peer sending a byte every few seconds would hold
    the connection's threads for ever. Here a read of ``n`` bytes must be complete within
    ``grace_s + n / bytes_per_s`` (``receive_grace_s``, ``min_receive_kb_s``); past that, as
    soon as no byte is waiting, the connection is cut (``too_slow`` is told) and the read
    returns what it has, which pynetdicom treats as a connection closed mid-PDU.
    """

    grace_s: float | None = None  # None: no deadline (a socket the listener did not set up)
    bytes_per_s: float = 1.0
    too_slow: Callable[[], None] = staticmethod(lambda: None)

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:
            logger.info("a peer announced a PDU of %d bytes; connection closed", nr_bytes)
            return bytearray()  # read as a connection closed before the PDU was complete
        if self.grace_s is None or self.socket is None:
            return super().recv(nr_bytes)
        data = self._recv_by(
            self.socket, nr_bytes, time.monotonic() + self.grace_s + nr_bytes / self.bytes_per_s
        )
        self.ack_now()  # a sender with Nagle's algorithm on need not wait 40 ms for our ACK
        return data

    def _recv_by(self, sock: socket.socket, nr_bytes: int, deadline: float) -> bytearray:
        data = bytearray()
        before = sock.gettimeout()
        try:
            while len(data) < nr_bytes:
                # Past the deadline, bytes already waiting are still read: a node too busy to read
                # them (a loaded machine) must not blame the peer. Only a wait that finds none cuts.
                left = max(deadline - time.monotonic(), 0.01)
                sock.settimeout(left if before is None else min(left, before))
                try:
                    chunk = sock.recv(min(4096, nr_bytes - len(data)))
                except TimeoutError:
                    if time.monotonic() < deadline:
                        raise  # the socket's own (network) timeout: pynetdicom's to report
                    break
                if not chunk:
                    return data
                data.extend(chunk)
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(before)
        if len(data) < nr_bytes:
            self.too_slow()
            cut(sock)
        return data


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's server with the listener's checks at accept time and the TLS handshake off the accept loop."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[evt.EventHandlerType] | None = None,
        *,
        listener: Listener,
    ) -> None:
        self.listener = listener
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None  # bound in __init__; pynetdicom declares it optional
        client, address = self.socket.accept()
        # A partial PDU must not block a reader for ever (an accepted socket blocks by default).
        # The sweeper cuts a slow negotiation at handshake_timeout_s; this is the backstop.
        client.settimeout(2 * self.listener.config.handshake_timeout_s)
        # Each PDU leaves when written, as on the node's own associations (dimse_reactor.PromptSocket).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: _Request, client_address: object) -> bool:
        return self.listener.admit_connection(_connection(request), client_address)

    def finish_request(self, request: _Request, client_address: object) -> None:
        """Runs in the connection's own thread: the TLS handshake here cannot stall the accept loop."""
        if isinstance(request, ssl.SSLSocket) and not self.listener.tls_handshake(request):
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: _Request, client_address: object) -> None:
        self.listener.protocol_error(
            f"connection from {_address(client_address)} failed while starting"
        )
        cut(_connection(request))


class Listener:
    """The DICOM side of the node: association control, C-ECHO and C-STORE into the spool.

    Args:
        config: the node's configuration.
        spool: where received instances go.
        audit: the audit trail.
        metrics: the node's metrics.
        gate: returns a :class:`Refusal` when the node cannot take an instance now.
        enqueue: called with the spool path of each instance acknowledged.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        spool: Spool,
        audit: AuditLog,
        metrics: Metrics,
        gate: Callable[[], Refusal | None],
        enqueue: Callable[[Path], None],
    ) -> None:
        self.config, self.spool, self.audit, self.metrics = config, spool, audit, metrics
        self.gate, self.enqueue = gate, enqueue
        self.networks = config.networks()
        self.connections = Connections()
        self.throttle = Throttle()  # a flood of refusals is in the audit trail, not the log
        self.bursts = Bursts(audit)
        self.server: GuardedServer | None = None
        # how the last associations that did DIMSE ended
        self._outcomes: deque[str] = deque(maxlen=CRASH_RUN)
        self._current = threading.local()  # the connection whose request this thread serves
        self._stop = threading.Event()
        self._accept = threading.Thread()
        self._sweeper = threading.Thread(target=self._sweep, name="listener-sweeper", daemon=True)
        metrics.gauge(
            "association_slots_in_use",
            lambda: {(): float(self.connections.held())},
            "association slots held (of max_associations)",
        )

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, ssl_context: ssl.SSLContext | None) -> None:
        # Data sets arrive in chunks, into the spool's tmp/: never whole in memory, and on the
        # spool's file system, so acceptance is a rename. (pynetdicom has these as globals.)
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Names dimse_messages imported for itself, which pynetdicom does not re-export.
        chunks_file = functools.partial(tempfile.NamedTemporaryFile, dir=str(self.spool.tmp))
        dimse_messages.NamedTemporaryFile = chunks_file  # type: ignore[attr-defined,assignment]
        dimse_messages.decode = decode_command_set  # type: ignore[attr-defined]
        ae = self._make_ae()
        server = ae.make_server(
            (self.config.host, self.config.port),
            ssl_context=ssl_context,
            evt_handlers=self._handlers(),
            server_class=GuardedServer,
            listener=self,
        )
        assert isinstance(server, GuardedServer)  # the server_class asked for
        self.server = server
        ae._servers.append(server)
        self._accept = threading.Thread(
            target=server.serve_forever, name="dicom-accept", daemon=True
        )
        self._accept.start()
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.config.port

    @property
    def alive(self) -> bool:
        """Whether the accept loop and the sweeper run (or were asked to stop)."""
        return self._stop.is_set() or (self._accept.is_alive() and self._sweeper.is_alive())

    def restart(self) -> None:
        """Start again whichever of the accept loop and the sweeper ended unexpectedly."""
        if not self._accept.is_alive():
            assert self.server is not None  # the supervisor restarts a listener it started
            self._accept = threading.Thread(
                target=self.server.serve_forever, name="dicom-accept", daemon=True
            )
            self._accept.start()
        if not self._sweeper.is_alive():
            self._sweeper = threading.Thread(
                target=self._sweep, name="listener-sweeper", daemon=True
            )
            self._sweeper.start()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        # The listener counts the slots itself (Connections.claim, at EVT_REQUESTED); pynetdicom's
        # own count (threads alive, those ending included) is only the backstop of a flood.
        ae.maximum_associations = FLOOD_FACTOR * self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_bytes
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.network_timeout = self.config.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = [] if self.config.allow_any_caller else list(self.config.allow)
        return ae

    def _handlers(self) -> list[evt.EventHandlerType]:
        notifications = [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_CONN_CLOSE, self._closed),
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_ACSE_SENT, self._acse_sent),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_DATA_RECV, self._data_received),
            (evt.EVT_DIMSE_RECV, self._message_received),
        ]
        services: list[evt.EventHandlerType] = [
            (evt.EVT_C_STORE, self._serve(self.handle_store, StoreStatus.OUT_OF_RESOURCES)),
            (evt.EVT_C_ECHO, self._serve(self.handle_echo, ECHO_FAILURE)),
        ]
        return services + [(event, self._guard(handler)) for event, handler in notifications]

    def _serve(
        self, handler: Callable[[evt.Event], int | Dataset], failure: int
    ) -> Callable[[evt.Event], int | Dataset]:
        """A DIMSE service handler that keeps its association active while it runs, and records how
        it ended. An exception escaping it is an internal error answered ``failure`` (pynetdicom would
        answer a C-ECHO success, and leave a C-STORE's temporary file behind)."""

        @functools.wraps(handler)
        def serve(event: evt.Event) -> int | Dataset:
            connection = self.connections.of(event.assoc)
            self._current.connection = connection
            if connection is not None:
                connection.serving += 1
            try:
                status = handler(event)
            except Exception as exc:  # noqa: BLE001 - recorded, and the sender may retry
                self._internal_error(connection, handler.__name__, exc)
                status = failure
            finally:
                self._current.connection = None
                if connection is not None:
                    connection.serving -= 1
                    connection.active = time.monotonic()
            if connection is not None and status == StoreStatus.SUCCESS:
                connection.served += 1
            return status

        return serve

    def _guard(self, handler: Callable[[evt.Event], None]) -> Callable[[evt.Event], None]:
        """A notification handler whose exception is recorded as the node's own, not a peer's protocol error."""

        @functools.wraps(handler)
        def guarded(event: evt.Event) -> None:
            try:
                handler(event)
            except Exception as exc:  # noqa: BLE001 - pynetdicom would log it as a peer's fault
                self._internal_error(self.connections.of(event.assoc), handler.__name__, exc)

        return guarded

    def _internal_error(
        self, connection: Connection | None, where: str, exc: BaseException
    ) -> None:
        logger.error("association handler %s: internal error (%s)", where, describe(exc))
        if connection is not None:
            connection.internal_error = f"{where}: {describe(exc)}"

    # --- connections ---------------------------------------------------------------------------------

    def admit_connection(self, request: socket.socket, client_address: object) -> bool:
        """At accept: the peer's network and its number of connections (socketserver's verify_request)."""
        try:
            return self._admit(request, _address(client_address))
        except Exception as exc:  # noqa: BLE001 - an exception here would end the accept loop
            logger.error("checking a new connection failed (%s); refused", describe(exc))
            return False

    def _admit(self, request: socket.socket, peer: str) -> bool:
        if not self._network_allowed(peer):
            self._rejected("network", peer=peer)
            return False
        # The association limits are answered politely at EVT_REQUESTED (A-ASSOCIATE-RJ); only a
        # flood, far past them, is closed here without a word.
        flooding = self.connections.count() >= FLOOD_FACTOR * self.config.max_associations
        if (
            flooding
            or self.connections.from_host(peer)
            >= FLOOD_FACTOR * self.config.max_associations_per_host
        ):
            self._rejected("connection-flood", peer=peer)
            return False
        self.connections.add(request, peer)
        return True

    def _network_allowed(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(
            address in network for network in self.networks if network.version == address.version
        )

    def tls_handshake(self, request: ssl.SSLSocket) -> bool:
        """The TLS handshake of one connection, in its own thread; False (recorded, closed) when it fails."""
        try:
            request.do_handshake()
            return True
        except (OSError, ValueError) as exc:
            connection = self.connections.by_socket(request)
            self._aborted(
                "tls-handshake",
                peer=connection.peer if connection else "",
                detail=type(exc).__name__,
            )
            self.connections.remove(connection)
            cut(request)
            request.close()
            return False

    def _opened(self, event: evt.Event) -> None:
        connection = self.connections.attach(event.assoc)
        socket_ = event.assoc.dul.socket
        if isinstance(socket_, AssociationSocket) and not isinstance(socket_, BoundedSocket):
            socket_.__class__ = BoundedSocket
        if connection is None:
            logger.debug("a connection opened that the listener did not see accepted")
        elif isinstance(socket_, BoundedSocket):
            socket_.grace_s, socket_.bytes_per_s = (
                self.config.receive_grace_s,
                self.config.min_receive_kb_s * 1000,
            )
            socket_.too_slow = functools.partial(self._cut_now, connection, "slow-transfer")

    def _closed(self, event: evt.Event) -> None:
        _discard_partial(event.assoc)
        connection = self.connections.of(event.assoc)
        if connection is not None and not connection.negotiated:
            _release_slot(event.assoc)
        if connection is not None and self.connections.remove(connection):
            self._ended(connection)

    def _ended(self, connection: Connection) -> None:
        """Remember how an association that did DIMSE work ended: served, or on an internal error."""
        if connection.served:
            self._outcomes.append("")
        elif connection.internal_error:
            self._outcomes.append(connection.internal_error)

    def _requested(self, event: evt.Event) -> None:
        """An association request arrived: turn it away (transient, congestion) when the node
        cannot take images now, before a sender pushes a whole data set at a full disk."""
        refusal = self.gate()
        connection = self.connections.of(event.assoc)
        if refusal is None:
            self._take_slot(event, connection)
            return
        if connection is not None:
            connection.refused = refusal.reason
        # PS3.8 9.3.4: rejected-transient, temporary congestion
        event.assoc.acse.send_reject(0x02, 0x03, 0x01)
        event.assoc.kill()

    def _take_slot(self, event: evt.Event, connection: Connection | None) -> None:
        """A slot for a request that will negotiate, or A-ASSOCIATE-RJ rejected-transient (PS3.8 9.3.4):
        per-host limit, no slot free, or only reserved ones left for an address holding many.
        A request that finds none free takes the slot of an association idle ``reclaim_idle_s``."""
        if connection is None or not self._would_negotiate(event.assoc):
            return  # pynetdicom rejects it (calling or called AE title) without a slot
        reason, reclaimed = self.connections.claim(connection, self.config)
        if reclaimed is not None:
            self._abort(reclaimed, "reclaimed")
        if reason is not None:
            connection.refused = reason
            event.assoc.acse.send_reject(*TRANSIENT_LIMIT)
            event.assoc.kill()

    def _would_negotiate(self, assoc: Association) -> bool:
        request = assoc.requestor.primitive
        assert request is not None  # asked at EVT_REQUESTED: the A-ASSOCIATE-RQ has arrived
        called, calling = (
            str(request.called_ae_title).strip(),
            str(request.calling_ae_title).strip(),
        )
        return called == self.config.ae_title.strip() and (
            self.config.allow_any_caller or calling in {aet.strip() for aet in self.config.allow}
        )

    def _acse_sent(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]  # set from the ACSE event's attributes, undeclared by pynetdicom
        if not isinstance(primitive, A_ASSOCIATE) or primitive.result in (None, 0):
            return
        connection = self.connections.of(event.assoc)
        if connection is not None:
            connection.negotiated, connection.admitted = True, False
        reason = (connection.refused if connection else "") or REJECTIONS.get(
            (primitive.result, primitive.result_source, primitive.diagnostic), "other"
        )
        self._rejected(reason, peer=_peer(event), calling_ae=_calling(event))

    def _accepted(self, event: evt.Event) -> None:
        connection = self.connections.of(event.assoc)
        if connection is not None:
            connection.negotiated, connection.active = True, time.monotonic()
            connection.sock.settimeout(self.config.network_timeout_s)
        # A sender proposes each SOP class in one or more presentation contexts (PS3.8 9.3.2.2;
        # storescu: two each, for every storage class it knows): what was refused is the SOP
        # class, counted once per association. Refusing what is not a chest radiograph is the
        # node doing its job, so one short INFO line; the classes at DEBUG, once per peer.
        refused = sorted(
            {_context_name(cx.abstract_syntax) for cx in event.assoc.rejected_contexts}
        )
        if refused:
            calling, peer = _calling(event), _peer(event)
            self.metrics.inc("contexts_refused", len(refused))
            # The peer's to repeat at will: in full a few times a minute, counted after that (Bursts).
            self.bursts.write(
                "association",
                ("contexts-refused", calling, peer, tuple(refused)),
                status="contexts-refused",
                calling_ae=calling,
                peer=peer,
                contexts=refused,
            )
            logger.info(
                "association from %s: %d proposed SOP class(es) refused (the list: --log-level DEBUG)",
                calling,
                len(refused),
            )
            # (caller, peer, classes) already listed
            listed = self.__dict__.setdefault("_refusals_listed", set())
            if logger.isEnabledFor(logging.DEBUG) and (calling, peer, tuple(refused)) not in listed:
                if len(listed) >= 1024:  # many peers, or a fuzzer: list again rather than grow
                    listed.clear()
                listed.add((calling, peer, tuple(refused)))
                logger.debug(
                    "SOP classes %s at %s proposes and the node refuses: %s",
                    calling,
                    peer,
                    ", ".join(refused),
                )

    def _data_received(self, event: evt.Event) -> None:
        """Count the bytes of the data set arriving; cut the association past the size cap."""
        connection = self.connections.of(event.assoc)
        if connection is not None:
            connection.active = time.monotonic()
        if not event.data or event.data[0] != 0x04:  # P-DATA-TF only
            return
        if connection is None or connection.cut_arriving:
            return
        connection.took(
            len(event.data),
            connection.active,
            self.config.receive_grace_s,
            self.config.min_receive_kb_s * 1000,
        )
        connection.since_disk_check += len(event.data)
        if connection.receiving > self.config.max_dataset_bytes + OVERHEAD_BYTES:
            self._cut_while_arriving(event, connection, "too-large")
        elif connection.since_disk_check >= DISK_CHECK_BYTES:
            connection.since_disk_check = 0
            if self.spool.free_bytes() < self.config.min_free_mb * 2**20:
                self._cut_while_arriving(event, connection, "disk-full")

    def _cut_while_arriving(self, event: evt.Event, connection: Connection, reason: str) -> None:
        connection.cut_arriving = reason
        self._refused(
            Refusal(StoreStatus.OUT_OF_RESOURCES, reason), _calling(event), _peer(event), ""
        )
        self.metrics.inc("associations_aborted", reason=reason)
        event.assoc.abort(block=False)

    def _message_received(self, event: evt.Event) -> None:
        stand_in_for_invalid_uids(event.message, event.assoc)
        connection = self.connections.of(event.assoc)
        if connection is not None:
            connection.receiving, connection.active = 0, time.monotonic()

    def _sweep(self) -> None:
        """Cut connections that have not negotiated within ``handshake_timeout_s``, free the
        association slot of every connection that closed before negotiating, and end the
        associations idle, arriving too slowly, or reclaimed under pressure (:meth:`_end_due`).

        pynetdicom's acceptor waits ``acse_timeout`` for an A-ASSOCIATE-RQ even after its
        connection is gone, holding a slot; an empty message ends that wait at once.
        """
        last_tmp_check = time.monotonic()
        while not self._stop.wait(0.25):
            if time.monotonic() - last_tmp_check > 60:
                last_tmp_check = time.monotonic()
                self.spool.remove_stale_tmp(STALE_TMP_S)
            self.bursts.flush()
            overdue, closed = self.connections.sweep(self.config.handshake_timeout_s)
            for connection in overdue:
                self._aborted("handshake-timeout", peer=connection.peer)
                cut(connection.sock)
            for connection in overdue + [c for c in closed if not c.negotiated]:
                _release_slot(connection.assoc)
            for connection in closed:
                _discard_partial(connection.assoc)
                self._ended(connection)
            self._end_due()

    def _end_due(self) -> None:
        """End the associations idle or arriving too slowly, and reclaim idle ones under pressure;
        cut the sockets of those that have not gone after their A-ABORT."""
        for connection, reason in self.connections.due(self.config):
            self._abort(connection, reason)
        for connection in self.connections.overdue_ends():
            cut(connection.sock)

    def _cut_now(self, connection: Connection, reason: str) -> None:
        """End an association at once, from any thread, its own included (its socket is cut, no A-ABORT)."""
        if self.connections.end(connection, reason):
            self._aborted(reason, peer=connection.peer)
        cut(connection.sock)

    def _abort(self, connection: Connection, reason: str) -> None:
        """Record an association the node ends, and send its A-ABORT (PS3.8 7.3.1, source: service-user);
        the sweeper cuts the socket ABORT_GRACE_S later if the peer has not gone."""
        self._aborted(reason, peer=connection.peer)
        try:
            if connection.assoc is not None:
                connection.assoc.abort(block=False)
        except Exception as exc:  # noqa: BLE001 - the cut that follows ends it all the same
            logger.debug("A-ABORT to %s not sent (%s)", connection.peer, describe(exc))

    def problems(self) -> list[str]:
        """What ``/health`` should say about receiving: threads not running, every slot in use,
        associations that keep ending on an internal error of the node's own."""
        found = []
        if not self._stop.is_set():
            if not self._accept.is_alive():
                found.append("the DICOM accept loop is not running")
            if not self._sweeper.is_alive():
                found.append("the listener's sweeper is not running")
        held = self.connections.held()
        if held >= self.config.max_associations:
            found.append(
                f"association slots exhausted: {held} of {self.config.max_associations} in use"
            )
        outcomes = list(self._outcomes)
        if len(outcomes) == CRASH_RUN and all(outcomes):
            found.append(
                f"the last {CRASH_RUN} associations each ended on an internal error of the node's own (last: {outcomes[-1]})"
            )
        return found

    # --- C-ECHO and C-STORE -----------------------------------------------------------------------------

    def handle_echo(self, event: evt.Event) -> int:
        return StoreStatus.SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """PS3.4 B.2.3: success only once the instance is durable in the spool; every refusal recorded."""
        request = event.request
        assert isinstance(request, C_STORE)  # the request of EVT_C_STORE
        calling, peer, uid = (
            _calling(event),
            _peer(event),
            str(request.AffectedSOPInstanceUID or "").strip(" \x00"),
        )
        if uid == INVALID_UID_STAND_IN:
            return _echoing_no_uid(
                self._refused(
                    Refusal(StoreStatus.CANNOT_UNDERSTAND, "invalid-uid"), calling, peer, ""
                )
            )
        try:
            refusal = self.gate() or self._receive(event, calling, peer, uid)
        except Exception as exc:  # noqa: BLE001 - the one place an exception becomes a status
            if is_transient(exc) or isinstance(exc, OSError):
                logger.error(
                    "spool write failed (%s)", getattr(exc, "strerror", None) or type(exc).__name__
                )
                refusal = Refusal(StoreStatus.OUT_OF_RESOURCES, "spool-write")
            else:
                logger.error(
                    "C-STORE from %s: internal error (%s); the sender may retry",
                    calling,
                    describe(exc),
                )
                refusal = Refusal(StoreStatus.OUT_OF_RESOURCES, "internal-error")
        if refusal is None:
            self.metrics.inc("received")
            return StoreStatus.SUCCESS
        return self._refused(refusal, calling, peer, uid)

    def _receive(self, event: evt.Event, calling: str, peer: str, uid: str) -> Refusal | None:
        connection = self.connections.of(event.assoc)
        if connection is not None and connection.cut_arriving:  # its reason, not always "too-large"
            return Refusal(StoreStatus.OUT_OF_RESOURCES, connection.cut_arriving)
        if event.dataset_path is None:
            # a C-STORE-RQ that says no data set follows (PS3.7 9.3.1.1: one must)
            return Refusal(StoreStatus.CANNOT_UNDERSTAND, "no-data-set")
        received = Path(event.dataset_path)
        if received.stat().st_size > self.config.max_dataset_bytes + OVERHEAD_BYTES:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "too-large")
        inflated = None
        try:
            if str(event.context.transfer_syntax) == DeflatedExplicitVRLittleEndian:
                received = inflated = self._inflate(received)
            problem = check_header(received, str(event.context.abstract_syntax), uid)
            if problem is not None:
                return problem
            path = self.spool.admit(received, Receipt(uid, calling, peer, time.time()))
        except TooLarge:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "too-large")
        except Unparseable:
            return Refusal(StoreStatus.CANNOT_UNDERSTAND, "unparseable")
        finally:
            if inflated is not None:
                inflated.unlink(missing_ok=True)
        self.enqueue(path)
        return None

    def _inflate(self, path: Path) -> Path:
        """The data set of a Deflated Explicit VR Little Endian file, inflated into tmp/, within the size cap.

        Raises:
            TooLarge: it inflates past ``max_dataset_mb``.
            Unparseable: the file meta or the deflate stream is broken, or the stream ends early.
        """
        try:
            meta, offset = split_dataset(path)
        except Exception as exc:  # file meta that does not parse
            raise Unparseable from exc
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        limit, total = self.config.max_dataset_bytes, 0
        target = self.spool.tmp / f"{self.spool.receipt_name()}.inflated.dcm"
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        with path.open("rb") as source, atomic_file(target, self.spool.tmp) as out:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]  # pydicom asks a DicomIO and a FileMetaDataset; it writes bytes to any file and reads a Dataset
            source.seek(offset)
            while chunk := source.read(2**20):
                while chunk:
                    try:
                        data = inflater.decompress(chunk, 2**20)
                    except zlib.error as exc:
                        raise Unparseable from exc
                    total += len(data)
                    if total > limit:
                        raise TooLarge
                    out.write(data)
                    chunk = inflater.unconsumed_tail
            try:
                rest = inflater.flush()
            except zlib.error as exc:
                raise Unparseable from exc
            if not inflater.eof:  # the stream stops short: a data set cut off on the way
                raise Unparseable
            if total + len(rest) > limit:
                raise TooLarge
            out.write(rest)
        return target

    def _refused(self, refusal: Refusal, calling: str, peer: str, uid: str) -> int:
        connection = getattr(self._current, "connection", None)
        if refusal.reason == "internal-error" and connection is not None:
            connection.internal_error = "handle_store: a C-STORE refused, internal-error"
        self.metrics.inc("refused", reason=refusal.reason)
        self.audit.write(
            "store-refused",
            calling_ae=calling,
            peer=peer,
            sop_instance_uid=safe_uid(uid),
            status="refused",
            status_code=f"0x{int(refusal.status):04X}",
            reason=refusal.reason,
        )
        self.throttle.log(
            logger,
            logging.WARNING,
            "C-STORE from %s refused: %s (0x%04X)",
            calling,
            refusal.reason,
            refusal.status,
        )
        return refusal.status

    # --- what the audit trail and the counters see ------------------------------------------------------

    def _rejected(self, reason: str, peer: str, calling_ae: str | None = None) -> None:
        self.metrics.inc("associations_rejected", reason=reason)
        self.bursts.write(
            "association",
            ("rejected", reason, peer, calling_ae),
            status="rejected",
            reason=reason,
            calling_ae=calling_ae,
            peer=peer,
        )
        self.throttle.log(
            logger,
            logging.WARNING,
            "association from %s (%s) rejected: %s",
            calling_ae or "?",
            peer,
            reason,
        )

    def _aborted(self, reason: str, peer: str, detail: str | None = None) -> None:
        self.metrics.inc("associations_aborted", reason=reason)
        self.bursts.write(
            "association",
            ("aborted", reason, peer),
            status="aborted",
            reason=reason,
            peer=peer,
            detail=detail,
        )
        self.throttle.log(logger, logging.INFO, "connection from %s cut: %s", peer, reason)

    def protocol_error(self, what: str) -> None:
        self.metrics.inc("protocol_errors")
        logger.info("%s", what)


#: Put in place of a C-STORE command's Affected SOP Instance UID that pynetdicom would not
#: take (see :func:`stand_in_for_invalid_uids`); no sender has it (a 2.25 UID derived from a sentence).
INVALID_UID_STAND_IN = derived_uid(
    "pacs_node", "C-STORE command", "Affected SOP Instance UID not valid"
)
#: CommandField of a C-STORE-RQ (PS3.7 E.1).
C_STORE_RQ = 0x0001


def stand_in_for_invalid_uids(message: DIMSEMessage, assoc: Association) -> None:
    """Let a C-STORE whose command UIDs pynetdicom would refuse reach the handler, to be refused by name.

    PS3.7 9.3.1.1: the Affected SOP Class and Instance UIDs of a C-STORE-RQ are UIs, at most
    64 characters (PS3.5 9.1). pynetdicom 3 checks them while turning the decoded message into
    its primitive (``dimse_primitives`` setters via ``utils.set_uid``); one that fails raises
    there, in ``DIMSEServiceProvider.receive_primitive``, which aborts the association: the
    sender gets no status, the node writes no audit line, and the images queued behind it on
    that association are lost to it. Called from EVT_DIMSE_RECV, which comes just before that
    conversion: a UID pynetdicom's own validator refuses (or an absent one) is replaced, the
    instance UID by :data:`INVALID_UID_STAND_IN` and the class UID by the abstract syntax of
    the presentation context, so that :meth:`Listener.handle_store` answers 0xC000 (cannot
    understand, PS3.4 B.2.3) and the association goes on.
    """
    command = getattr(message, "command_set", None)
    if command is None or command.get("CommandField") != C_STORE_RQ:
        return
    replace = {
        keyword: not _valid_command_uid(command, keyword)
        for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
    }
    if replace["AffectedSOPClassUID"]:
        context = next(
            (cx for cx in assoc.accepted_contexts if cx.context_id == message.context_id), None
        )
        if context is None:
            return  # no context either: pynetdicom aborts, as for any message on an unknown context
        command.AffectedSOPClassUID = context.abstract_syntax
    if any(replace.values()):
        command.AffectedSOPInstanceUID = INVALID_UID_STAND_IN


def _valid_command_uid(command: Dataset, keyword: str) -> bool:
    value = command.get(keyword)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or value.strip(" \x00") == INVALID_UID_STAND_IN:
        return False
    return _config.VALIDATORS["UI"](UID(value.strip(" \x00")))[0]


def decode_command_set(
    bytestring: BytesIO, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> Dataset:
    """pynetdicom's ``dsutils.decode`` (as ``dimse_messages`` calls it), and a C-STORE-RQ command set
    whose Affected SOP Class or Instance UID is absent, empty or not valid made one pynetdicom can take.

    With chunked receiving, pynetdicom writes the received file's meta information (PS3.10 7.1)
    from the command's two UIDs as soon as the command set is decoded, before any event handler
    runs: an absent UID raised there, an empty one failed its meta check, and either aborted the
    association with no status and no audit line. Each such UID is put here as
    :data:`INVALID_UID_STAND_IN`; :func:`stand_in_for_invalid_uids` then gives the class UID the
    presentation context's own, and :meth:`Listener.handle_store` refuses the instance by name.
    """
    dataset = dsutils.decode(bytestring, is_implicit_vr, is_little_endian, deflated)
    if dataset.get("CommandField") == C_STORE_RQ:
        for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
            if not _valid_command_uid(dataset, keyword):
                setattr(dataset, keyword, INVALID_UID_STAND_IN)
    return dataset


def _echoing_no_uid(status: int) -> Dataset:
    """A C-STORE response status without the command's UIDs (both U(=) in the response, PS3.7 9.1.1.1):
    the node never echoes the stand-in of a UID it could not take."""
    response = Dataset()
    response.Status = int(status)
    response.AffectedSOPClassUID = response.AffectedSOPInstanceUID = None
    return response


def check_header(path: Path, sop_class: str, sop_instance: str) -> Refusal | None:
    """PS3.4 B.2.3: refuse what is not parseable, cut short, or not what the command says it is."""
    try:
        header = dcmread(
            path,
            stop_before_pixels=True,
            defer_size=4096,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        found_class = str(header.get("SOPClassUID", "")).strip(" \x00")
        found_instance = str(header.get("SOPInstanceUID", "")).strip(" \x00")
        if cut_short(path):
            return Refusal(StoreStatus.CANNOT_UNDERSTAND, "truncated")
    except EOFError:  # an undefined-length value whose delimiter never came
        return Refusal(StoreStatus.CANNOT_UNDERSTAND, "truncated")
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse gets the same status
        return Refusal(StoreStatus.CANNOT_UNDERSTAND, "unparseable")
    if found_class != sop_class:
        return Refusal(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "sop-class-mismatch")
    if found_instance != sop_instance:
        return Refusal(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "instance-uid-mismatch")
    return None


def cut_short(path: Path) -> bool:
    """Whether the data set's last top-level element is longer than what arrived of it.

    A sender (or a proxy) that stops mid-element still ends its message with a last fragment
    (PS3.8 E.2); pydicom reads such a file without a word, and the node would acknowledge an
    object that is not the one the modality holds, which may then delete its only good copy.
    Values are skipped, not read (``defer_size``): the walk costs the element headers only.
    A cut inside an undefined-length sequence is not seen here (pydicom ends it at the end of
    the file); the image is then skipped or failed by name after acknowledgement.

    Raises:
        EOFError: an undefined-length value (encapsulated pixel data) ends before its delimiter.
    """
    meta, offset = split_dataset(path)
    syntax = UID(str(meta.TransferSyntaxUID))
    end, size = offset, path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(offset)
        for element in data_element_generator(
            handle, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=256
        ):
            if isinstance(element, RawDataElement) and element.length != 0xFFFFFFFF:
                end = element.value_tell + element.length
            else:
                end = handle.tell()
    return end > size


def _address(client_address: object) -> str:
    return (
        str(client_address[0]) if isinstance(client_address, (tuple, list)) else str(client_address)
    )


def _connection(request: _Request) -> socket.socket:
    """The socket of a connection: the listener's server is a stream server."""
    assert isinstance(request, socket.socket), "a stream server's request is its connection"
    return request


def _peer(event: evt.Event) -> str:
    try:
        return str(event.assoc.requestor.address)
    except Exception:  # noqa: BLE001 - a half-built association names no peer; a log line never raises
        return ""


def _calling(event: evt.Event) -> str:
    """The calling AE title, also before negotiation has copied it from the request."""
    try:
        requestor = event.assoc.requestor
        return str(
            requestor.ae_title or getattr(requestor.primitive, "calling_ae_title", "") or ""
        ).strip()
    except Exception:  # noqa: BLE001 - a half-built association names no caller; a log line never raises
        return ""


def _context_name(uid: UID | None) -> str:
    name = getattr(uid, "name", "") or ""
    return name if name and name != str(uid) else safe_uid(uid)


def server_tls(config: NodeConfig) -> ssl.SSLContext:
    """The listening side's TLS context (PS3.15 B.1); callers' certificates against ``ca`` or the system store."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    if config.tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        if config.tls.ca:
            context.load_verify_locations(cafile=config.tls.ca)
        else:
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    return context


def client_tls(config: NodeConfig) -> ssl.SSLContext:
    """The sending side's TLS context: destinations' certificates against ``ca`` or the system store."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls.ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls.cert:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    return context
