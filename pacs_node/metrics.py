"""What the node counts, and the HTTP endpoint that shows it (loopback by default).

Metrics are ``prometheus_client`` counters, histograms and gauges in a registry of the
node's own, every family declared once in :data:`COUNTERS` and :data:`HISTOGRAMS` with its
labels and help. ``GET /metrics`` answers the Prometheus text format; ``GET /health``
answers JSON (``status`` ok, degraded or failed, and the problems found), with HTTP 200
only when ok, so that a container health check or a load balancer can use it as it is.

No client can hold the endpoint's threads: each connection is closed ``http_timeout_s``
after it opened, whether its request was read or not (a silent or trickling client included),
and past ``http_max_connections`` open at once a new one is answered 503 and closed by the
accept loop itself, without a thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

PREFIX = "dp_node_"

#: Counter families: name (without ``_total``) -> (help, label names).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "received": ("instances acknowledged (durable in the spool)", ()),
    "refused": ("C-STORE requests refused, by reason", ("reason",)),
    "processed": (
        "instances with results handed over, by decision (positive, negative, not-assessed)",
        ("outcome",),
    ),
    "triage_flags": (
        "instances whose probability of pneumonia reached the bundle's triage point",
        (),
    ),
    "out_of_distribution": (
        "instances outside the model's training distribution: not assessed",
        (),
    ),
    "skipped": ("instances that got no result, by reason", ("reason",)),
    "failed": ("instances whose processing failed for good, by reason", ("reason",)),
    "retries": ("instances put back for a later try, by reason", ("reason",)),
    "delivered": ("result objects accepted by a destination", ("destination",)),
    "dead_letters": (
        "result objects given up on, by destination and reason",
        ("destination", "reason"),
    ),
    "delivery_holds": (
        "times a destination's deliveries were held until a person acts, by reason (authentication)",
        ("destination", "reason"),
    ),
    "associations_rejected": ("association requests rejected, by reason", ("reason",)),
    "associations_aborted": ("associations the node cut, by reason", ("reason",)),
    "contexts_refused": (
        "SOP classes refused at association negotiation, each counted once per association however many presentation contexts proposed it (storescu proposes every storage class: expected, not an error)",
        (),
    ),
    "protocol_errors": ("malformed or unexpected PDUs and broken connections", ()),
    "thread_restarts": ("worker or sender threads restarted after an unexpected exit", ("thread",)),
    "audit_write_errors": ("audit lines that could not be written at once (kept and retried)", ()),
}
#: Latency histograms in seconds: name -> (help, buckets).
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "processing_seconds": (
        "from acknowledgement to results handed over",
        (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
    ),
    "inference_seconds": (
        "one forward pass of a batch",
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    ),
    "delivery_seconds": (
        "one C-STORE of a result, or one STOW-RS request of a batch, to a destination",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
    ),
}

Labels = tuple[tuple[str, str], ...]

# ``*_created`` samples (creation timestamps of each series) say nothing an operator needs.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated


class Metrics:
    """The node's metrics; thread-safe (prometheus_client's are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = {
            name: Counter(PREFIX + name, text, labels, registry=self.registry)
            for name, (text, labels) in COUNTERS.items()
        }
        self._histograms = {
            name: Histogram(PREFIX + name, text, buckets=buckets, registry=self.registry)
            for name, (text, buckets) in HISTOGRAMS.items()
        }
        self._gauges = _Gauges()
        self.registry.register(self._gauges)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add to the counter ``name`` (with or without its ``_total`` suffix)."""
        counter = self._counters[name.removesuffix("_total")]
        (counter.labels(**labels) if labels else counter).inc(amount)

    def observe(self, name: str, seconds: float) -> None:
        self._histograms[name].observe(seconds)

    def gauge(self, name: str, read: Callable[[], dict[Labels, float]], help_text: str) -> None:
        """A gauge read when scraped: ``read()`` returns ``{labels: value}``."""
        self._gauges.add(PREFIX + name, read, help_text)

    def value(self, name: str, **labels: str) -> float:
        """The current value of a counter sample (``received_total``) or histogram sample; 0 if unseen."""
        name = name if name.endswith(("_total", "_count", "_sum")) else name + "_total"
        return self.registry.get_sample_value(PREFIX + name, labels) or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges:
    """A collector of gauges whose values are read from the node when scraped."""

    def __init__(self) -> None:
        self._gauges: dict[str, tuple[Callable[[], dict[Labels, float]], str]] = {}

    def add(self, name: str, read: Callable[[], dict[Labels, float]], help_text: str) -> None:
        self._gauges[name] = (read, help_text)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (read, help_text) in sorted(self._gauges.items()):
            values = read()
            labels = sorted({key for labelled in values for key, _ in labelled})
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for labelled, value in sorted(values.items()):
                family.add_metric([dict(labelled)[key] for key in labels], value)
            yield family


#: What ``socketserver`` hands a server's methods: a stream server's connection is a socket; the
#: tuple is a datagram server's, which this module never runs.
_Request = socket.socket | tuple[bytes, socket.socket]
#: A peer's address as ``accept`` gives it: (host, port), with flow info and scope id for IPv6.
_Address = tuple[str, int] | tuple[str, int, int, int]

#: What a connection past the cap is told before it is closed.
BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n"


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose connections each have a deadline, and whose number is capped.

    The deadline is enforced by the accept loop (``service_actions`` runs every
    ``poll_interval``): a connection still open past it has its socket shut down, which ends
    its thread's read or write at once. The handler's socket timeout bounds each read too.
    """

    daemon_threads = True
    #: Connections the kernel holds until the accept loop takes them (socketserver's 5 drops the
    #: SYNs of a burst, which clients then retry a second or three later).
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        timeout_s: float,
        max_connections: int,
    ) -> None:
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def verify_request(self, request: _Request, client_address: _Address) -> bool:
        request = _connection(request)
        with self._lock:
            if len(self._deadlines) < self.max_connections:
                self._deadlines[request] = time.monotonic() + self.timeout_s
                return True
        _tell_busy(request)
        return False

    def shutdown_request(self, request: _Request) -> None:
        with self._lock:
            self._deadlines.pop(_connection(request), None)
        super().shutdown_request(request)

    def handle_error(self, request: _Request, client_address: _Address) -> None:
        """A connection cut or dropped mid-request: one debug line, not a traceback on stderr."""
        logger.debug(
            "HTTP connection from %s ended early", client_address[0] if client_address else "?"
        )

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, deadline in self._deadlines.items() if deadline < now]
            for sock in late:
                self._deadlines[sock] = float("inf")  # cut once; its thread closes it
        for sock in late:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _connection(request: _Request) -> socket.socket:
    """The socket of a connection: a ``ThreadingHTTPServer`` is a stream server."""
    assert isinstance(request, socket.socket), "a stream server's request is its connection"
    return request


def _tell_busy(request: socket.socket) -> None:
    """503 to a connection past the cap, without waiting on it (the accept loop must not block)."""
    try:
        request.setblocking(False)
        request.send(BUSY)
    except OSError:
        pass


class MetricsServer:
    """``/health``, ``/ready`` and ``/metrics`` over HTTP on a background thread.

    Args:
        host, port: where to listen (port 0: any free port).
        metrics: what ``/metrics`` shows.
        health: what ``/health`` answers.
        ready: why the node does not take images now, or None when it does: ``/ready``
            answers 200 or 503 with the reason (a load balancer's check: a node whose
            destination is down is degraded, yet still takes images).
        timeout_s: each connection is closed this long after it opened (``http_timeout_s``).
        max_connections: connections open at once (``http_max_connections``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        timeout_s: float = 10.0,
        max_connections: int = 16,
        ready: Callable[[], str | None] = lambda: None,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # each read; the server's deadline bounds the whole connection

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    outer._reply(self, 200, metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    state = health()
                    outer._reply(
                        self,
                        200 if state.get("status") == "ok" else 503,
                        json.dumps(state).encode(),
                        "application/json",
                    )
                elif path == "/ready":
                    why = ready()
                    body = f"not ready: {why}\n" if why else "ready\n"
                    outer._reply(self, 503 if why else 200, body.encode(), "text/plain")
                else:
                    outer._reply(
                        self, 404, b"not found: try /health, /ready or /metrics\n", "text/plain"
                    )

            def log_message(self, *_args: object) -> None:  # requests are not worth a log line each
                pass

        self.server = BoundedHTTPServer((host, port), Handler, timeout_s, max_connections)
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": min(0.5, timeout_s / 4)},
            name="metrics-http",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
