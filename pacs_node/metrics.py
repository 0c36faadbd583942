"""Counters the node keeps, and the HTTP endpoint that shows them (loopback by default).

``GET /health`` answers JSON (``status`` ok or degraded, queue depth, per-destination
backlog); ``GET /metrics`` answers the Prometheus text format (version 0.0.4).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)


class Metrics:
    """Thread-safe counters and summaries, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.gauges: dict[str, Callable[[], dict[tuple[tuple[str, str], ...], float]]] = {}
        self.help: dict[str, str] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += amount

    def observe(self, name: str, seconds: float) -> None:
        """A summary without quantiles: ``name_sum`` and ``name_count``."""
        with self._lock:
            self.counters[(f"{name}_sum", ())] += seconds
            self.counters[(f"{name}_count", ())] += 1

    def gauge(self, name: str, read: Callable[[], dict[tuple[tuple[str, str], ...], float]], help_text: str) -> None:
        self.gauges[name] = read
        self.help[name] = help_text

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self.counters[(name, tuple(sorted(labels.items())))]

    def render(self) -> str:
        lines, typed = [], set()
        with self._lock:
            items = sorted(self.counters.items())
        for (name, labels), value in items:
            family, kind = _family(name)
            if family not in typed:
                typed.add(family)
                lines.append(f"# TYPE dp_node_{family} {kind}")
            lines.append(f"dp_node_{name}{_labels(labels)} {value:g}")
        for name, read in sorted(self.gauges.items()):
            lines.append(f"# HELP dp_node_{name} {self.help[name]}")
            lines.append(f"# TYPE dp_node_{name} gauge")
            for labels, value in sorted(read().items()):
                lines.append(f"dp_node_{name}{_labels(labels)} {value:g}")
        return "\n".join(lines) + "\n"


def _family(name: str) -> tuple[str, str]:
    """The metric family a sample belongs to, and its type: ``x_sum`` and ``x_count`` are a summary."""
    for suffix in ("_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)], "summary"
    return name, "counter"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + body + "}"


class MetricsServer:
    """``/health`` and ``/metrics`` over HTTP on a background thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: Callable[[], dict]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] == "/metrics":
                    outer._reply(self, 200, metrics.render(), "text/plain; version=0.0.4")
                elif self.path.split("?")[0] == "/health":
                    state = health()
                    outer._reply(self, 200 if state.get("status") == "ok" else 503, json.dumps(state), "application/json")
                else:
                    outer._reply(self, 404, "not found: try /health or /metrics\n", "text/plain")

            def log_message(self, *_args) -> None:  # requests are not worth a log line each
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, body: str, content_type: str) -> None:
        data = body.encode()
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
