"""``dp-node``: the Deep Pneumonia DICOM node.

Examples::

    dp-node --bundle runs/demo/bundle
    dp-node --config configs/node.yaml --destination PACS@10.0.0.5:104 --allow MODALITY1
    storescu -aec DPNODE localhost 11112 chest.dcm      # send it an image (dcmtk)

Options mirror keys of the configuration (``configs/node.yaml`` lists them all); the
command line overrides the file. SIGTERM or Ctrl-C stop it gracefully: the batch in
flight is finished and everything else stays in the spool for the next start.

Exit codes: 0 after a stop asked for; 2 when the configuration, the bundle or the device
is not usable (one line says why); 3 when the node gave up because a thread kept dying,
so that a service manager (systemd, Docker's restart policy) starts it afresh.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import threading
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

# Light imports only: `dp-node --help` and every mistake in the arguments answer at once;
# PyTorch, MONAI and pydicom (seconds on two cores) come once the arguments are known good.
from dp_model.config import ConfigError, load_arguments
from pacs_node.config import NodeConfig

if TYPE_CHECKING:
    from pacs_node.node import Node

logger = logging.getLogger("dp-node")

#: The embedded default bundle (``make run`` builds it when absent).
DEMO_BUNDLE = Path("runs/demo/bundle")

OPTIONS = {
    "port": "port",
    "host": "host",
    "ae_title": "ae_title",
    "bundle": "bundle",
    "spool": "spool",
    "output_dir": "output_dir",
    "destination": "destinations",
    "allow": "allow",
    "allow_network": "allow_networks",
    "allow_any_caller": "allow_any_caller",
    "device": "device",
    "metrics_port": "metrics_port",
    "operating_point": "operating_point",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-node",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML configuration (default: the embedded default)")
    p.add_argument("--port", type=int, help="DICOM port to listen on (default 11112)")
    p.add_argument(
        "--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"
    )
    p.add_argument("--ae-title", help="this node's AE title (default DPNODE)")
    p.add_argument("--bundle", help=f"MONAI bundle written by dp-train (default {DEMO_BUNDLE})")
    p.add_argument("--spool", help="folder of received instances not yet finished")
    p.add_argument("--output-dir", help="where results go when no destination is set")
    p.add_argument(
        "--destination",
        action="append",
        metavar="AET@HOST:PORT|URL",
        help="send results there by C-STORE, or by STOW-RS to a DICOMweb URL (repeatable)",
    )
    p.add_argument(
        "--allow",
        action="append",
        metavar="AET",
        help="accept these calling AE titles (repeatable; replaces the configured list)",
    )
    p.add_argument(
        "--allow-network",
        action="append",
        metavar="CIDR",
        help="accept callers from this network, e.g. 10.1.0.0/16 (repeatable; replaces the configured list)",
    )
    p.add_argument(
        "--allow-any-caller",
        action="store_const",
        const=True,
        help="accept any calling AE title (an open node; said at start)",
    )
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument(
        "--metrics-port", type=int, help="HTTP port of /health and /metrics on loopback (-1: off)"
    )
    p.add_argument(
        "--operating-point", type=float, help="threshold on the probability of pneumonia"
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def load(args: argparse.Namespace) -> NodeConfig:
    config = load_arguments(NodeConfig, args, OPTIONS)
    if not config.bundle:
        if not (DEMO_BUNDLE / "configs" / "metadata.json").exists():
            raise ConfigError(
                f"no bundle: pass --bundle, set bundle in the config, or build the demo bundle with `make demo-bundle` ({DEMO_BUNDLE})"
            )
        config = replace(config, bundle=str(DEMO_BUNDLE))
    return config


def check_bundle(config: NodeConfig) -> None:
    """A bundle path that names nothing is said so at once, not after PyTorch has loaded."""
    if not Path(config.bundle).exists():
        raise ConfigError(
            f"bundle {config.bundle} does not exist: pass --bundle (config key bundle) with a folder dp-train wrote, or build the demo bundle with `make demo-bundle`"
        )


#: The node's listening ports: config key -> (option, what to add to the advice).
PORTS = {
    "port": ("--port", ""),
    "metrics_port": ("--metrics-port", "; -1 turns /health and /metrics off"),
}


def check_ports(config: NodeConfig) -> None:
    """Bind and listen on the DICOM and metrics ports for a moment, before the model loads.

    A port in use would otherwise surface as a bare ``[Errno 98]`` only after the seconds the
    model takes to load, without saying which port. Both sockets are held together, so the same
    port given twice is caught too; they are closed at once (``SO_REUSEADDR``, as both servers
    set it, so that a port just released by a previous run is not mistaken for one in use).
    """
    with ExitStack() as held:
        for key, host in (("port", config.host), ("metrics_port", config.metrics_host)):
            port = getattr(config, key)
            if port <= 0:  # 0: any free port; -1: metrics off
                continue
            sock = held.enter_context(
                socket.socket(
                    socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
                )
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host.strip("[]"), port))
                sock.listen(1)
            except OSError as exc:
                raise ConfigError(_port_problem(key, host, port, exc)) from exc


def _port_problem(key: str, host: str, port: int, exc: OSError) -> str:
    option, more = PORTS[key]
    if exc.errno == errno.EADDRINUSE:
        why = "is in use (another dp-node, or another program)"
    elif exc.errno == errno.EACCES:
        why = "needs privileges (a port below 1024)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"cannot be opened: {host} is not an address of this machine"
    else:
        why = f"cannot be opened ({exc.strerror or exc})"
    return f"port {port} on {host} {why}: choose another with {option} (config key {key}){more}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    logging.captureWarnings(True)  # warnings go through the logs, where values are withheld
    for chatty in ("pynetdicom", "highdicom"):
        # one line per association or module copied is too much
        logging.getLogger(chatty).setLevel(
            logging.DEBUG if args.log_level == "DEBUG" else logging.WARNING
        )
    try:
        config = load(args)
        check_bundle(config)
        check_ports(config)  # before the model's seconds of loading
    except (ConfigError, OSError, ValueError) as exc:
        return _fail(exc)
    from pydicom import config as pydicom_config

    from pacs_node.node import Node  # heavy imports after the configuration is known good

    # Strict writing: an output that is not valid DICOM is an error, never a file sent on.
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        node = Node(config)
        node.start()
    except (OSError, ValueError) as exc:  # ConfigError and BundleError are ValueErrors
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            # taken between the check and now
            exc = ConfigError(
                f"a port was taken while the model loaded ({exc.strerror}): DICOM port {config.port} (--port), metrics port {config.metrics_port} (--metrics-port)"
            )
        return _fail(exc)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    _announce(node, config)
    while not done.wait(1.0) and not node.failed.is_set():
        pass
    logger.info("stopping: finishing the batch in flight")
    node.stop()
    if node.failed.is_set():
        print(
            f"dp-node: {node.fatal}; exiting so that the service manager restarts the node",
            file=sys.stderr,
        )
        return 3
    return 0


def _fail(exc: BaseException) -> int:
    print(f"dp-node: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def _announce(node: Node, config: NodeConfig) -> None:
    model = node.predictor.contract
    where = (
        ", ".join(map(str, config.parsed_destinations()))
        if config.destinations
        else f"{Path(config.output_dir).resolve()}/<StudyInstanceUID>/"
    )
    print(
        f"dp-node: {config.ae_title} listening on port {node.port}, model {model.name} {model.version}{' (DEMONSTRATION)' if model.demo else ''}",
        flush=True,
    )
    print(
        f"  send an image:  storescu -aec {config.ae_title} localhost {node.port} chest.dcm",
        flush=True,
    )
    print(f"  results go to:  {where}", flush=True)
    if node.metrics_port:
        print(
            f"  health/metrics: http://{config.metrics_host}:{node.metrics_port}/health  /metrics",
            flush=True,
        )
    print(f"  audit log:      {config.audit_path}", flush=True)
    callers = "any calling AE title" if config.allow_any_caller else ", ".join(config.allow)
    print(
        f"  accepts:        {callers} from {', '.join(config.allow_networks)}{'' if config.tls.listening else ' (no TLS)'}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
