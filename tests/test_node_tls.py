"""TLS on both sides of the node (PS3.15 B.1), with a certificate made by openssl."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import pytest
from helpers import require_tool
from node_support import chest_dataset, free_port, wait_for
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from pacs_node.config import NodeConfig, TLSConfig
from pacs_node.delivery.cstore import RESULT_CLASSES
from pacs_node.model.predictor import NodePredictor
from pacs_node.node import Node


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            require_tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_node_listens_and_sends_over_tls_and_refuses_plain_tcp(
    tmp_path: Path, demo_bundle: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    stored: list[str] = []
    destination = AE(ae_title="RESULTS")
    for sop_class in RESULT_CLASSES:
        destination.add_supported_context(
            sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    dest_port = free_port()
    handlers = [
        (evt.EVT_C_STORE, lambda event: stored.append(event.request.AffectedSOPInstanceUID) or 0)
    ]
    dest_server = destination.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=handlers, ssl_context=server_side
    )
    tls = TLSConfig(cert=str(cert), key=str(key), ca=str(cert), send=True)
    config = NodeConfig(
        port=0,
        metrics_port=-1,
        spool=str(tmp_path / "spool"),
        bundle=str(demo_bundle),
        destinations=(f"RESULTS@127.0.0.1:{dest_port}",),
        tls=tls,
        allow=("MODALITY",),
    )
    node = Node(config, NodePredictor(demo_bundle, "cpu"))
    node.start()
    try:
        client = ssl.create_default_context(cafile=str(cert))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(
            "127.0.0.1", node.port, ae_title="DPNODE", tls_args=(client, "127.0.0.1")
        )
        assert assoc.is_established
        assert int(assoc.send_c_store(chest_dataset()).Status) == 0
        assoc.release()
        wait_for(lambda: len(stored) == 2, 60, "the SR and the SC over TLS")
        plain = ae.associate("127.0.0.1", node.port, ae_title="DPNODE")
        assert not plain.is_established
    finally:
        node.stop()
        dest_server.shutdown()


def test_a_silent_connection_does_not_stall_the_tls_handshakes_of_others(
    tmp_path: Path, demo_bundle: Path, certificate: tuple[Path, Path]
) -> None:
    """The handshake runs in each connection's thread: one peer that never speaks blocks nobody,
    and is cut after ``handshake_timeout_s``."""
    import socket

    cert, key = certificate
    config = NodeConfig(
        port=0,
        metrics_port=-1,
        spool=str(tmp_path / "spool"),
        bundle=str(demo_bundle),
        allow=("MODALITY",),
        tls=TLSConfig(cert=str(cert), key=str(key)),
        handshake_timeout_s=6.0,
    )
    node = Node(config, NodePredictor(demo_bundle, "cpu"))
    node.start()
    silent = socket.create_connection(("127.0.0.1", node.port), timeout=60)
    opened = time.monotonic()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate(
            "127.0.0.1",
            node.port,
            ae_title="DPNODE",
            tls_args=(ssl.create_default_context(cafile=str(cert)), "127.0.0.1"),
        )
        assert assoc.is_established, (
            "a legitimate TLS association waited behind a silent connection"
        )
        assert int(assoc.send_c_store(chest_dataset()).Status) == 0
        assoc.release()
        # The silent peer was still connected all along: the association did not get through
        # because the silent one had already been cut.
        assert time.monotonic() - opened < config.handshake_timeout_s
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)
        silent.setblocking(True)
        assert silent.recv(1) == b""  # cut once the handshake timeout has passed
    finally:
        silent.close()
        node.stop()
