"""What the node counts, and the HTTP endpoint that shows it (loopback by default).

Metrics are ``prometheus_client`` counters, histograms and gauges in a registry of the
node's own, every family declared once in :data:`COUNTERS` and :data:`HISTOGRAMS` with its
labels and help. ``GET /metrics`` answers the Prometheus text format; ``GET /health``
answers JSON (``status`` ok, degraded or failed, and the problems found), with HTTP 200
only when ok, so that a container health check or a load balancer can use it as it is.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

PREFIX = "dp_node_"

#: Counter families: name (without ``_total``) -> (help, label names).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "received": ("instances acknowledged (durable in the spool)", ()),
    "refused": ("C-STORE requests refused, by reason", ("reason",)),
    "processed": ("instances with results handed over, by decision (positive, negative, not-assessed)", ("outcome",)),
    "triage_flags": ("instances whose probability of pneumonia reached the bundle's triage point", ()),
    "out_of_distribution": ("instances outside the model's training distribution: not assessed", ()),
    "skipped": ("instances that got no result, by reason", ("reason",)),
    "failed": ("instances whose processing failed for good, by reason", ("reason",)),
    "retries": ("instances put back for a later try, by reason", ("reason",)),
    "delivered": ("result objects accepted by a destination", ("destination",)),
    "dead_letters": ("result objects given up on, by destination and reason", ("destination", "reason")),
    "delivery_holds": ("times a destination's deliveries were held until a person acts, by reason (authentication)", ("destination", "reason")),
    "associations_rejected": ("association requests rejected, by reason", ("reason",)),
    "associations_aborted": ("associations the node cut, by reason", ("reason",)),
    "contexts_refused": ("SOP classes refused at association negotiation, each counted once per association however many presentation contexts proposed it (storescu proposes every storage class: expected, not an error)", ()),
    "protocol_errors": ("malformed or unexpected PDUs and broken connections", ()),
    "thread_restarts": ("worker or sender threads restarted after an unexpected exit", ("thread",)),
    "audit_write_errors": ("audit lines that could not be written at once (kept and retried)", ()),
}
#: Latency histograms in seconds: name -> (help, buckets).
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "processing_seconds": ("from acknowledgement to results handed over", (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800)),
    "inference_seconds": ("one forward pass of a batch", (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)),
    "delivery_seconds": ("one C-STORE of a result, or one STOW-RS request of a batch, to a destination", (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)),
}

Labels = tuple[tuple[str, str], ...]

# ``*_created`` samples (creation timestamps of each series) say nothing an operator needs.
disable_created_metrics()


class Metrics:
    """The node's metrics; thread-safe (prometheus_client's are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = {name: Counter(PREFIX + name, text, labels, registry=self.registry) for name, (text, labels) in COUNTERS.items()}
        self._histograms = {name: Histogram(PREFIX + name, text, buckets=buckets, registry=self.registry) for name, (text, buckets) in HISTOGRAMS.items()}
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

    def collect(self):
        for name, (read, help_text) in sorted(self._gauges.items()):
            values = read()
            labels = sorted({key for labelled in values for key, _ in labelled})
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for labelled, value in sorted(values.items()):
                family.add_metric([dict(labelled)[key] for key in labels], value)
            yield family


class MetricsServer:
    """``/health`` and ``/metrics`` over HTTP on a background thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: Callable[[], dict]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    outer._reply(self, 200, metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    state = health()
                    outer._reply(self, 200 if state.get("status") == "ok" else 503, json.dumps(state).encode(), "application/json")
                else:
                    outer._reply(self, 404, b"not found: try /health or /metrics\n", "text/plain")

            def log_message(self, *_args) -> None:  # requests are not worth a log line each
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

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
