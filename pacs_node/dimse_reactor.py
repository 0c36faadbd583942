"""pynetdicom's two association loops made to wait for work instead of polling every millisecond,
and its association sockets made to send and acknowledge without delay.

pynetdicom 3.0 runs two threads per association, each in a loop that sleeps 1 ms and then
looks for work: ``DULServiceProvider.run_reactor`` (a primitive to send, data on the socket, an
event for the state machine) and ``Association._run_reactor`` (a DIMSE message to serve, a
release or abort from the peer, the network timeout). Two thousand wake-ups a second per
association, busy or idle, were the largest CPU cost per image of the node (docs/node_profile.svg).

:func:`install` replaces both loops with ones that block until there is work, and otherwise do
exactly what pynetdicom's do, in the same order:

* The DUL loop blocks in ``select()`` on the association's socket and on a wake-up socket pair.
  Every queue the loop reads (``event_queue``, ``to_provider_queue``) signals the wake-up when
  an item is put on it, whichever thread puts it, as does ``kill_dul()`` / ``stop_dul()``
  (through ``_kill_thread``). The wait is bounded by the ARTIM timer's remaining time (so
  Evt18 fires on time) and by :data:`MAX_WAIT_S`.
* The association loop blocks on a :class:`threading.Event` set when a DIMSE message is queued
  (``dimse.msg_queue``), when the DUL queues a primitive for the user (``to_user_queue``: a
  release or abort), when the DUL thread ends, and when the association is killed. The wait is
  bounded by the network idle timer's remaining time (so ``network_timeout`` fires on time) and
  by :data:`MAX_WAIT_S`. While it waits it counts as paused (``_is_paused``): it touches no
  DIMSE or ACSE state, so ``send_c_store()`` and ``release()`` need not wait for it to wake.

The module also has the node's association sockets (:class:`PromptSocket`, built by
:class:`PromptAE` for the node's own associations and the base of the listener's socket): each
PDU leaves when written (TCP_NODELAY) and each read is acknowledged at once (TCP_QUICKACK).
pynetdicom writes a C-STORE as two PDUs and leaves Nagle's algorithm on; a peer that does the
same (dcmtk's storescu and storescp by default) holds its second write until the first is
acknowledged, which Linux delays up to 40 ms while nothing goes back: one 40 ms stall per
message each way, whatever the loops do.

And it has a message's P-DATA-TF PDUs leave in bundles (:data:`BUNDLE_BYTES`): pynetdicom
hands each PDU of a message from the sending thread to the association's DUL thread through a
queue, one state-machine event each, and writes each with its own socket call. The overlay of
a radiograph (12 MB) is 740 PDUs to a peer that takes 16 kB PDUs (dcmtk's and Orthanc's
default), and those hand-offs between two threads were most of the CPU the node spent sending
it. :func:`install` has ``send_msg`` hand the PDUs over in bundles of about 1 MB, each one event
of the state machine (Evt9; DT-1 in Sta6, AR-7 in Sta8, both replaced) written in one go; the
peer receives the same PDUs, byte for byte, in the same order.

Nothing a peer sees changes: the same state machine runs the same actions; only the idle waits
between them, and how many PDUs one event sends (one Evt9, one EVT_FSM_TRANSITION per
bundle; EVT_PDU_SENT still once per PDU), differ. The patch is pinned to pynetdicom 3.0.x, whose loops it restates:
:func:`install` refuses any other version (pynetdicom's own loops then run, as before), and an
association built before :func:`install` keeps pynetdicom's loops. The node installs it at
start (:meth:`pacs_node.node.Node.start`); importing this module changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import pynetdicom
from pynetdicom import AE, fsm
from pynetdicom.association import LOGGER as _ASSOC_LOGGER
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dul import LOGGER as _DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AddressInformation, AssociationSocket

logger = logging.getLogger(__name__)

#: The longest either loop sleeps without a signal: a backstop for a change of state that
#: signals nothing (none is known), ten wake-ups a second instead of a thousand.
MAX_WAIT_S = 0.1

#: About how many bytes of one message's P-DATA-TF PDUs are handed to the DUL thread, and
#: written to the socket, at once.
BUNDLE_BYTES = 1 << 20

#: The most one socket call writes (:meth:`PromptSocket.send`).
WRITE_CHUNK = 64 * 1024

#: The pynetdicom versions whose loops this module restates.
SUPPORTED = "3.0."

_originals: dict[tuple[type, str], Any] = {}


class _SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``notify`` after each item is put on it."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Wakeup:
    """A socket pair the DUL loop selects on beside the association's socket; coalesced signals."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._pending = False
        self.count = 0  # how often the loop woke from a wait (tests)

    def signal(self) -> None:
        if self._pending:
            return  # a byte is already on its way; the loop reads the queues after draining it
        self._pending = True
        with contextlib.suppress(OSError):  # buffer full (a byte is there) or closed (loop ended)
            self._writer.send(b"\0")

    def wait(self, others: list[socket.socket], timeout: float) -> None:
        """Block until a signal, data on ``others`` or ``timeout``; then take the signals."""
        try:
            select.select([self._reader, *others], [], [], timeout)
        except (OSError, ValueError):
            time.sleep(0.001)  # a socket closed under us: pynetdicom's loop finds out, as before
        self.count += 1
        with contextlib.suppress(OSError):
            while self._reader.recv(4096):
                pass
        # After draining, never before: a byte written between the two would be drained while
        # _pending stayed set, and every later signal would be dropped until the backstop
        # wait. A signal dropped here needs no byte: its item was put before it, and the loop
        # reads the queues after this wait.
        self._pending = False

    def close(self) -> None:
        self._pending = True  # no more writes
        self._reader.close()
        self._writer.close()


def _kill_property(name: str, notify: Callable[[Any], None]) -> property:
    """A flag pynetdicom sets to stop a loop, kept where pynetdicom keeps it, that also wakes the loop."""

    def get(self: Any) -> bool:
        return bool(self.__dict__.get(name, False))

    def set_(self: Any, value: bool) -> None:
        self.__dict__[name] = value
        if value:
            notify(self)

    return property(get, set_)


def _wake_dul(dul: DULServiceProvider) -> None:
    wakeup = dul.__dict__.get("_dp_wakeup")
    if wakeup is not None:
        wakeup.signal()


def _wake_association(assoc: Association) -> None:
    activity = assoc.__dict__.get("_dp_activity")
    if activity is not None:
        activity.set()


def _association_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _originals[Association, "__init__"](self, *args, **kwargs)
    activity = threading.Event()
    dul = self.dul
    # Nothing has been put on these yet: the association's threads start later.
    dul.event_queue = _SignallingQueue(functools.partial(_wake_dul, dul))
    dul.to_provider_queue = _SignallingQueue(functools.partial(_wake_dul, dul))
    dul.to_user_queue = _SignallingQueue(activity.set)
    self.dimse.msg_queue = _SignallingQueue(activity.set)
    self.__dict__["_dp_activity"] = activity


def _timer_wait(timer: Any, bound: float) -> float:
    """``bound``, or less when ``timer`` runs out sooner (just past its expiry, to find it expired)."""
    if timer.timeout is None or timer._start_time is None or timer._end_time is not None:
        return bound
    return min(bound, max(float(timer.remaining), 0.0) + 0.001)


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """``DULServiceProvider.run_reactor`` of pynetdicom 3.0.4, its sleep replaced by :meth:`_Wakeup.wait`."""
    if not isinstance(self.event_queue, _SignallingQueue):  # built before install()
        _originals[DULServiceProvider, "run_reactor"](self)
        return
    # Made here, not with the association: its sockets live only while the loop runs. A put
    # before this line signals nothing and needs not: the loop looks before its first wait.
    wakeup = _Wakeup()
    self.__dict__["_dp_wakeup"] = wakeup
    try:
        _dul_loop(self, wakeup)
    finally:
        wakeup.close()
        _wake_association(self.assoc)  # its loop checks dul.is_alive()


def _dul_loop(self: DULServiceProvider, wakeup: _Wakeup) -> None:
    self._idle_timer.start()
    wait = False
    while True:
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()

        if wait and (sockets := _dul_sockets(self)) is not None:
            wakeup.wait(sockets, _timer_wait(self.artim_timer, MAX_WAIT_S))

        if self._kill_thread:
            break

        if self.artim_timer.expired:
            self.event_queue.put("Evt18")

        try:
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
        except Exception as exc:  # noqa: BLE001 - as pynetdicom's loop: abort, log
            _DUL_LOGGER.error("Exception in DUL.run(), aborting association")
            _DUL_LOGGER.exception(exc)
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            assert self.socket is not None  # as pynetdicom assumes here
            self.socket.send(abort_pdu.encode())
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True
            return

        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            wait = True
            continue

        self.state_machine.do_action(event)
        wait = False


def _dul_sockets(dul: DULServiceProvider) -> list[socket.socket] | None:
    """The connection to select on (none once closed), or None when the loop must not sleep:
    an SSL socket holding decrypted bytes that select cannot see (``ready`` reports them)."""
    sock = dul.socket
    if sock is None or sock.socket is None or not sock._is_connected:
        return []
    raw = sock.socket
    if isinstance(raw, ssl.SSLSocket):
        with contextlib.suppress(OSError, ValueError):
            if raw.pending():
                return None
    return [raw]


def _association_run_reactor(self: Association) -> None:
    """``Association._run_reactor`` of pynetdicom 3.0.4, its sleep replaced by waiting for activity."""
    activity: threading.Event | None = self.__dict__.get("_dp_activity")
    if activity is None:  # built before install()
        _originals[Association, "_run_reactor"](self)
        return
    activity.set()  # look once before the first wait
    self._is_paused = False
    while not self._kill:
        # Waiting counts as paused: a send_*() that finds it paused goes ahead at once.
        self._is_paused = True
        activity.wait(_timer_wait(self.dul._idle_timer, MAX_WAIT_S))
        activity.clear()  # before looking: whatever is put after this sets it again
        # Unpaused before the checkpoint is read, and read again after every wait at it: a
        # send_*() that found this loop paused has cleared the checkpoint already, so the loop
        # stops here instead of taking that call's response off the queue (which left the
        # call waiting until its DIMSE timeout, and a C-STORE stored once was sent again). A
        # loop held up just after the checkpoint let it through (a send of the next message
        # saw it still paused) thus finds it closed again.
        while True:
            self._is_paused = False
            if self._reactor_checkpoint.is_set():
                break
            self._is_paused = True
            # A caller waits for its response. The DUL wakes it with the "connection closed"
            # marker when the connection closes, but not when it aborts on a broken PDU (AA-8:
            # a peer killed in the middle of one), and the caller waited its whole DIMSE
            # timeout. Seen from here, the abort is passed on to it as that marker, and the
            # association stops counting as established at once: a caller going straight on
            # to its next message would otherwise keep this loop paused, the abort unhandled,
            # one DIMSE timeout after another (the loop handles it when the caller is done).
            if not self._reactor_checkpoint.wait(MAX_WAIT_S) and self.acse.is_aborted():
                self.is_established = False
                if self.dimse.msg_queue.empty():
                    self.dimse.msg_queue.put((None, None))

        # The DUL puts a "connection closed" marker, (None, None), for a caller waiting on a
        # response, then runs the EVT_CONN_CLOSE handlers, and only then queues the A-P-ABORT
        # this loop acts on. Woken by the marker, the loop leaves it where it is: taken here,
        # a send_*() made before the abort is seen waited its whole DIMSE timeout for it.
        if self.dimse.peek_msg()[1] is not None:
            context_id, msg = self.dimse.get_msg(block=False)
            activity.set()  # another message may be queued behind it
            self._serve_request(cast(Any, msg), cast(int, context_id))

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _ASSOC_LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _ASSOC_LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            _ASSOC_LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


class _Bundle(P_DATA):
    """Consecutive P-DATA requests of one message, sent as consecutive P-DATA-TF PDUs in one
    write: ``encoded``, each PDU exactly as pynetdicom's ``P_DATA_TF`` encodes it. Only the
    replaced actions DT-1 and AR-7 send it (:data:`_ACTIONS`); the fragments are held once,
    encoded, not also as a list of PDVs."""

    def __init__(self, parts: list[P_DATA]) -> None:
        super().__init__()
        self.encoded = b"".join(_encode_p_data_tf(part) for part in parts)

    def pdus(self) -> Iterator[P_DATA_TF]:
        """Its PDUs, decoded again (for EVT_PDU_SENT handlers, where any are bound)."""
        offset = 0
        while offset < len(self.encoded):
            (length,) = struct.unpack_from(">I", self.encoded, offset + 2)
            pdu = P_DATA_TF()
            pdu.decode(self.encoded[offset : offset + 6 + length])
            yield pdu
            offset += 6 + length


def _encode_p_data_tf(pdata: P_DATA) -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5): type 04H, a reserved byte, the length, then each PDV
    item: its length, the presentation context ID, the message control header and fragment."""
    items = b"".join(
        struct.pack(">IB", len(value) + 1, context_id) + value
        for context_id, value in pdata.presentation_data_value_list
    )
    return struct.pack(">BBI", 0x04, 0x00, len(items)) + items


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` of pynetdicom 3.0.4, its P-DATA requests handed to
    the DUL in bundles of about :data:`BUNDLE_BYTES` instead of one by one."""
    if primitive.MessageIDBeingRespondedTo is None:
        dimse_msg = _RQ_TO_MESSAGE[primitive.__class__]()
    else:
        dimse_msg = _RSP_TO_MESSAGE[primitive.__class__]()
    dimse_msg.primitive_to_message(primitive)
    dimse_msg.context_id = context_id
    pynetdicom.evt.trigger(self.assoc, pynetdicom.evt.EVT_DIMSE_SENT, {"message": dimse_msg})
    parts: list[P_DATA] = []
    size = 0
    for pdata in dimse_msg.encode_msg(context_id, self.maximum_pdu_size):
        parts.append(pdata)
        size += sum(len(value) for _, value in pdata.presentation_data_value_list)
        if size >= BUNDLE_BYTES:
            self.dul.send_pdu(_Bundle(parts) if len(parts) > 1 else parts[0])
            parts, size = [], 0
    if parts:
        self.dul.send_pdu(_Bundle(parts) if len(parts) > 1 else parts[0])


def _sending_p_data(state: str) -> Callable[[DULServiceProvider], str]:
    """pynetdicom 3.0.4's actions that send a P-DATA request, DT-1 (Sta6 + Evt9) and AR-7
    (Sta8 + Evt9: data goes on while the peer's release request waits), which also send a
    bundle's PDUs in one write; EVT_PDU_SENT is triggered for each, as for PDUs sent one by one."""

    def action(dul: DULServiceProvider) -> str:
        primitive = cast(P_DATA, dul.to_provider_queue.get(False))  # Evt9: a P-DATA request
        if not isinstance(primitive, _Bundle):
            dul._send(P_DATA_TF(primitive))
            return state
        if dul.socket is None:
            _DUL_LOGGER.warning("Attempted to send data over closed connection")
            return state
        dul.socket.send(primitive.encoded)
        if dul.assoc.get_handlers(pynetdicom.evt.EVT_PDU_SENT):
            for pdu in primitive.pdus():
                pynetdicom.evt.trigger(dul.assoc, pynetdicom.evt.EVT_PDU_SENT, {"pdu": pdu})
        return state

    return action


_PATCHES: list[tuple[type, str, Any]] = [
    (Association, "__init__", _association_init),
    (Association, "_run_reactor", _association_run_reactor),
    (Association, "_kill", _kill_property("_kill", _wake_association)),
    (DULServiceProvider, "run_reactor", _dul_run_reactor),
    (DULServiceProvider, "_kill_thread", _kill_property("_kill_thread", _wake_dul)),
    (DIMSEServiceProvider, "send_msg", _send_msg),
]
#: The state machine's action table entries replaced (pynetdicom looks them up on every event):
#: every action that sends a P-DATA request.
_ACTIONS: dict[str, tuple[str, Callable[[DULServiceProvider], str], Sequence[str]]] = {
    "DT-1": ("Send P-DATA-TF PDU", _sending_p_data("Sta6"), "Sta6"),
    "AR-7": ("Issue P-DATA-TF PDU", _sending_p_data("Sta8"), "Sta8"),
}


def installed() -> bool:
    return bool(_originals)


def install() -> bool:
    """Put the waiting loops in place of pynetdicom's for associations built from now on.

    Returns False, and changes nothing, on a pynetdicom other than 3.0.x: its loops may differ
    from those restated here, so they are left to run as they are. Calling it twice is harmless.
    """
    if installed():
        return True
    if not pynetdicom.__version__.startswith(SUPPORTED):
        logger.warning(
            "pynetdicom %s: association loops left polling (the waiting loops are written for %sx)",
            pynetdicom.__version__,
            SUPPORTED,
        )
        return False
    for cls, name, replacement in _PATCHES:
        _originals[cls, name] = cls.__dict__.get(name)
        setattr(cls, name, replacement)
    actions: dict[str, Any] = fsm.ACTIONS  # its entries' callables name their argument
    for name, entry in _ACTIONS.items():
        _originals[dict, name] = actions[name]
        actions[name] = entry
    return True


def uninstall() -> None:
    """pynetdicom's own loops again, for associations built from now on (tests)."""
    actions: dict[str, Any] = fsm.ACTIONS
    for (cls, name), original in _originals.items():
        if cls is dict:
            actions[name] = original
        elif original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    _originals.clear()


def _set_option(sock: socket.socket | None, option: int) -> None:
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):  # closed, or not TCP
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)


#: Linux only; elsewhere reads are acknowledged as the system decides.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class PromptSocket(AssociationSocket):
    """pynetdicom's association socket, sending each PDU when written and acknowledging each read at once.

    TCP_NODELAY is set on a socket this class creates (an association the node requests); the
    listener sets it on the sockets it accepts. TCP_QUICKACK is not kept by Linux once set, so
    it is set again after every read.
    """

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = super()._create_socket(address)
        _set_option(sock, socket.TCP_NODELAY)
        return sock

    def send(self, bytestream: bytes) -> None:
        """As pynetdicom 3.0's ``AssociationSocket.send``, its writes taken from a memoryview
        at most :data:`WRITE_CHUNK` at a time: pynetdicom's loop copied what was left of a
        write after each partial send, which a bundle of PDUs (about 1 MB) meets on every
        write; and each call keeps the association's timeout to itself, as before (``sendall``
        would make it a deadline for the whole bundle, which a slow link could miss)."""
        sock = cast(socket.socket, self.socket)
        view = memoryview(bytestream)
        try:
            sent = 0
            while sent < len(view):
                sent += sock.send(view[sent : sent + WRITE_CHUNK])
            pynetdicom.evt.trigger(self.assoc, pynetdicom.evt.EVT_DATA_SENT, {"data": bytestream})
        except Exception:  # noqa: BLE001 - as pynetdicom's: Evt17, transport connection closed
            self.event_queue.put("Evt17")

    def recv(self, nr_bytes: int) -> bytearray:
        data = super().recv(nr_bytes)
        self.ack_now()
        return data

    def ack_now(self) -> None:
        """Acknowledge what was read without waiting for data to go back with the ACK."""
        if _QUICKACK is not None:
            _set_option(self.socket, _QUICKACK)


class PromptAE(AE):
    """pynetdicom's application entity whose requested associations use :class:`PromptSocket`."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        # As pynetdicom 3.0's ApplicationEntity._create_socket, with the class changed.
        sock = PromptSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock
