"""``python -m pacs_node.health``: the container health check, asking the node itself.

Exits 0 when ``GET /health`` says ok, 1 otherwise (degraded, failed, or no answer), and
prints one line either way. The port is ``DP_NODE_METRICS_PORT`` (default 8089) on
``DP_NODE_METRICS_HOST`` (default 127.0.0.1), as ``metrics_host`` / ``metrics_port``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any


def main(argv: list[str] | None = None) -> int:
    summary, details = __doc__.split("\n\n", 1)
    argparse.ArgumentParser(
        prog="python -m pacs_node.health",
        description=summary.split(": ", 1)[1].replace("``", ""),
        epilog=details.replace("``", ""),
    ).parse_args(argv)
    host = os.environ.get("DP_NODE_METRICS_HOST", "127.0.0.1")
    port = os.environ.get("DP_NODE_METRICS_PORT", "8089")
    url = f"http://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            state = json.loads(reply.read())
    except urllib.error.HTTPError as error:
        state = _json(error.read())
    except (OSError, ValueError) as exc:
        print(f"dp-node health: no answer from {url} ({type(exc).__name__})")
        return 1
    status = state.get("status", "unknown")
    print(
        f"dp-node health: {status}"
        + (f": {'; '.join(state.get('problems', []))}" if status != "ok" else "")
    )
    return 0 if status == "ok" else 1


def _json(body: bytes) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(body)  # the node's own /health: a JSON object
        return state
    except ValueError:
        return {}


if __name__ == "__main__":
    sys.exit(main())
