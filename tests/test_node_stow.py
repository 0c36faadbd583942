"""Results to a DICOMweb service by STOW-RS, with the outbox's guarantees: each result once, nothing lost.

A small STOW-RS service in this file counts every request and every instance it stores,
and misbehaves on demand (busy, a connection dropped before or after it stored, instances
refused, credentials refused); Orthanc with its DICOMweb plugin is the real peer.
"""

from __future__ import annotations

import io
import json
import logging
import ssl
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import require_file, require_tool
from node_support import (
    Orthanc,
    audit_lines,
    chest_dataset,
    identity_of,
    send,
    start_node,
    wait_for,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from pacs_node.config import NodeConfig, OutboxConfig, TLSConfig, WebDestination
from pacs_node.delivery.outbox import DestinationSender

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PASSWORD = "orthanc-test-password-7f3a"


class StowService:
    """A DICOMweb service on loopback: stores what STOW-RS brings (counted by SOP Instance UID),
    answers QIDO-RS about it, and answers each POST as ``script`` says, then "store":

    * "store": store, answer 200, or 202 / 409 with FailedSOPSequence for the UIDs in ``refuse``;
    * "busy": answer 503 with ``Retry-After: retry_after``, store nothing;
    * "drop": read the body, close the connection without answering, store nothing;
    * "store-drop": store, then close the connection without answering.

    ``blame_batch``: a request holding a UID of ``refuse`` among others gets 400 without
    saying which. ``token``: the Bearer token every request must carry (else 401).
    ``answer``: ``json`` or ``xml``.
    """

    def __init__(
        self,
        script=(),
        refuse=None,
        blame_batch=False,
        token=None,
        answer="json",
        retry_after="1",
        tls=None,
    ) -> None:
        self.script, self.refuse, self.blame_batch, self.token = (
            list(script),
            dict(refuse or {}),
            blame_batch,
            token,
        )
        self.answer, self.retry_after, self.tls = answer, retry_after, tls
        self.stored: Counter[str] = Counter()
        self.syntaxes: dict[str, str] = {}
        self.posts, self.request_sizes, self.asked, self.client_names, self.unauthorized = (
            0,
            [],
            [],
            [],
            0,
        )
        self.lock = threading.Lock()

    def start(self) -> StowService:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            # keep-alive: the sender's connection carries several requests
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                owner.post(self)

            def do_GET(self) -> None:
                owner.query(self)

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def post(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        with self.lock:
            self.posts += 1
            plan = self.script[self.posts - 1] if self.posts <= len(self.script) else "store"
            self.request_sizes.append(len(body))
            if self.tls is not None:
                self.client_names.append(
                    dict(pair[0] for pair in handler.request.getpeercert()["subject"])["commonName"]
                )
        if not self._authorized(handler):
            return
        if plan == "busy":
            return _reply(handler, 503, b"", {"Retry-After": self.retry_after})
        instances = _parts(body, handler.headers["Content-Type"])
        uids = [str(ds.SOPInstanceUID) for ds in instances]
        if plan == "drop":
            handler.close_connection = True
            return
        if self.blame_batch and len(uids) > 1 and set(uids) & set(self.refuse):
            return _reply(handler, 400, b"")
        stored = [ds for ds in instances if str(ds.SOPInstanceUID) not in self.refuse]
        with self.lock:
            for ds in stored:
                self.stored[str(ds.SOPInstanceUID)] += 1
                self.syntaxes[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
        if plan == "store-drop":
            handler.close_connection = True
            return
        failed = [uid for uid in uids if uid in self.refuse]
        status = 200 if not failed else 202 if stored else 409
        content = _store_answer(stored, failed, self.refuse, self.answer)
        _reply(handler, status, content, {"Content-Type": f"application/dicom+{self.answer}"})

    def query(self, handler: BaseHTTPRequestHandler) -> None:
        if not self._authorized(handler):
            return
        uid = parse_qs(urlsplit(handler.path).query)["SOPInstanceUID"][0]
        with self.lock:
            self.asked.append(uid)
            found = [{"00080018": {"vr": "UI", "Value": [uid]}}] if self.stored[uid] else []
        _reply(handler, 200, json.dumps(found).encode(), {"Content-Type": "application/dicom+json"})

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        if self.token is None or handler.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        with self.lock:
            self.unauthorized += 1
        _reply(handler, 401, b"", {"WWW-Authenticate": 'Bearer realm="dicom-web"'})
        return False


def _reply(
    handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _parts(body: bytes, content_type: str) -> list[Dataset]:
    """The instances of a STOW-RS request, checked as PS3.18 8.6.1.2 says they come: PS3.10 files."""
    assert (
        content_type.startswith("multipart/related;") and 'type="application/dicom"' in content_type
    )
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    chunks = body.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    instances = []
    for chunk in chunks[1:-1]:
        head, data = chunk.split(b"\r\n\r\n", 1)
        assert head.strip() == b"Content-Type: application/dicom" and data.endswith(b"\r\n")
        # not forced: a preamble and DICM, or it raises
        instances.append(dcmread(io.BytesIO(data[:-2])))
    return instances


def _store_answer(
    stored: list[Dataset], failed: list[str], reasons: dict[str, int], kind: str
) -> bytes:
    """The Store Instances Response Module (PS3.18 10.5.3) in DICOM JSON or XML."""
    answer = Dataset()
    answer.ReferencedSOPSequence = [_item(str(ds.SOPInstanceUID)) for ds in stored]
    answer.FailedSOPSequence = [_item(uid, FailureReason=reasons[uid]) for uid in failed]
    if kind == "json":
        return json.dumps(answer.to_json_dict()).encode()
    items = {
        tag: "".join(
            f'<Item number="{n}"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{i.ReferencedSOPInstanceUID}</Value></DicomAttribute>'
            + (
                f'<DicomAttribute tag="00081197" vr="US"><Value number="1">{i.FailureReason}</Value></DicomAttribute>'
                if "FailureReason" in i
                else ""
            )
            + "</Item>"
            for n, i in enumerate(sequence, 1)
        )
        for tag, sequence in (
            ("00081199", answer.ReferencedSOPSequence),
            ("00081198", answer.FailedSOPSequence),
        )
    }
    return (
        '<?xml version="1.0" encoding="utf-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        + "".join(
            f'<DicomAttribute tag="{tag}" vr="SQ">{inner}</DicomAttribute>'
            for tag, inner in items.items()
        )
        + "</NativeDicomModel>"
    ).encode()


def _item(uid: str, **attributes) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = SecondaryCaptureImageStorage, uid
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def result(index: int, side: int = 300, jpeg_ls: bool = False) -> Dataset:
    """A Secondary Capture as the outbox would hold it."""
    ds = chest_dataset(rows=side, columns=side, seed=index, Modality="OT")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if jpeg_ls:
        ds.compress(JPEGLSLossless)
    return ds


class Recorder:
    """What a sender reports: deliveries ``(uid, ok)`` and holds ``(reason, detail)``."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, bool]] = []
        self.holds: list[tuple[str | None, str]] = []

    def delivered(self, destination, uid: str, source: str, reason: str | None) -> None:
        self.deliveries.append((uid, reason is None))

    def held(self, destination, reason: str | None, detail: str) -> None:
        self.holds.append((reason, detail))


def sender(
    tmp_path: Path,
    destination: WebDestination,
    recorder: Recorder,
    results: list[Dataset],
    **settings,
) -> DestinationSender:
    """A started sender to ``destination`` with ``results`` in its outbox."""
    config = OutboxConfig(**{"initial_backoff_s": 0.2, "max_backoff_s": 1.0} | settings)
    s = DestinationSender(
        destination,
        tmp_path / "outbox",
        calling_ae="DPNODE",
        config=config,
        on_delivered=recorder.delivered,
        timeout_s=5,
        on_held=recorder.held,
    )
    for ds in results:
        s.put(ds, "source")
    s.start()
    return s


def uids_of(results: list[Dataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in results]


@pytest.mark.parametrize(("max_request_mb", "many_requests"), [(64, False), (1, True)])
def test_a_batch_goes_in_multipart_requests_within_the_size_cap_and_each_result_is_stored_once(
    tmp_path: Path, max_request_mb: int, many_requests: bool
) -> None:
    service = StowService().start()
    # about 0.6 MB each uncompressed
    results = [result(i, side=560) for i in range(4)] + [result(4, jpeg_ls=True)]
    recorder = Recorder()
    s = sender(
        tmp_path, WebDestination(service.url), recorder, results, max_request_mb=max_request_mb
    )
    try:
        wait_for(lambda: len(recorder.deliveries) == 5, 30, "five deliveries")
        assert service.stored == Counter(dict.fromkeys(uids_of(results), 1)) and all(
            ok for _, ok in recorder.deliveries
        )
        # sent as the outbox holds it
        assert service.syntaxes[uids_of(results)[4]] == JPEGLSLossless
        if many_requests:
            assert service.posts >= 3 and max(service.request_sizes) <= 2**20 + 4096
        else:
            assert service.posts == 1
        assert s.pending() == [] and not list(s.ledger.glob("*.sending"))
    finally:
        s.stop()
        service.stop()


@pytest.mark.parametrize(
    ("retry_after", "max_backoff_s", "waits"), [("1", 4.0, [1.0, 1.0]), ("3600", 2.0, [2.0, 2.0])]
)
def test_a_busy_service_is_left_alone_as_long_as_it_asks_within_the_cap_and_gets_each_result_once(
    tmp_path: Path, retry_after: str, max_backoff_s: float, waits: list[float]
) -> None:
    service = StowService(script=["busy", "busy"], retry_after=retry_after).start()
    results = [result(i) for i in range(3)]
    recorder, paused = Recorder(), []
    s = sender(
        tmp_path,
        WebDestination(service.url),
        recorder,
        [],
        initial_backoff_s=0.1,
        max_backoff_s=max_backoff_s,
    )
    s._pause = lambda seconds: paused.append(seconds)  # record the wait instead of sleeping it
    for ds in results:
        s.put(ds, "source")
    s.wake()
    try:
        wait_for(lambda: len(recorder.deliveries) == 3, 30, "three deliveries")
        assert paused[:2] == waits  # the backoff alone would have waited 0.1 s, then 0.2 s
        assert service.posts == 3 and service.stored == Counter(dict.fromkeys(uids_of(results), 1))
    finally:
        s.stop()
        service.stop()


@pytest.mark.parametrize("stored_before_the_drop", [True, False])
def test_a_request_left_unanswered_is_asked_about_with_qido_and_sent_again_only_when_missing(
    tmp_path: Path, stored_before_the_drop: bool
) -> None:
    """The connection breaks after the body left: the results are in doubt. QIDO-RS says
    whether the service has them; what it has is never sent twice."""
    service = StowService(script=["store-drop" if stored_before_the_drop else "drop"]).start()
    results = [result(i) for i in range(3)]
    recorder = Recorder()
    s = sender(tmp_path, WebDestination(service.url), recorder, results)
    try:
        wait_for(lambda: len(recorder.deliveries) == 3, 30, "three deliveries")
        # each one in doubt was asked about
        assert sorted(service.asked) == sorted(uids_of(results))
        assert service.posts == (1 if stored_before_the_drop else 2)
        assert service.stored == Counter(dict.fromkeys(uids_of(results), 1))
        assert all(ok for _, ok in recorder.deliveries) and not list(s.ledger.glob("*.sending"))
    finally:
        s.stop()
        service.stop()


@pytest.mark.parametrize("answer", ["json", "xml"])
def test_an_instance_the_service_fails_is_refused_alone_and_the_rest_are_stored_once(
    tmp_path: Path, answer: str
) -> None:
    results = [result(i) for i in range(3)]
    bad = uids_of(results)[1]
    service = StowService(refuse={bad: 0xC122}, answer=answer).start()
    recorder = Recorder()
    s = sender(tmp_path, WebDestination(service.url), recorder, results, max_refusals=2)
    try:
        wait_for(lambda: len(recorder.deliveries) == 3, 30, "two deliveries and a dead letter")
        assert service.stored == Counter(dict.fromkeys(uids_of(results)[::2], 1))
        assert service.posts == 2  # all three (202), then the refused one alone again (409)
        assert (
            dict(recorder.deliveries)[bad] is False
            and "0xC122" in (s.dead / f"{bad}.why.txt").read_text()
        )
        assert s.pending() == []
    finally:
        s.stop()
        service.stop()


def test_a_request_refused_without_saying_which_instance_is_sent_again_one_by_one(
    tmp_path: Path,
) -> None:
    results = [result(i) for i in range(3)]
    bad = uids_of(results)[0]
    service = StowService(refuse={bad: 0xC000}, blame_batch=True).start()
    recorder = Recorder()
    s = sender(tmp_path, WebDestination(service.url), recorder, results, max_refusals=1)
    try:
        wait_for(lambda: len(recorder.deliveries) == 3, 30, "two deliveries and a dead letter")
        assert service.posts == 4  # the three together (400), then each alone
        assert (
            service.stored == Counter(dict.fromkeys(uids_of(results)[1:], 1))
            and dict(recorder.deliveries)[bad] is False
        )
    finally:
        s.stop()
        service.stop()


def test_refused_credentials_hold_the_results_until_the_secret_is_mended_with_no_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service = StowService(token="right-token-5b1e").start()
    secret = tmp_path / "token"
    secret.write_text("wrong-token-9c2d\n")
    results = [result(i) for i in range(2)]
    recorder = Recorder()
    s = sender(
        tmp_path,
        WebDestination(service.url, auth="bearer", secret_file=str(secret)),
        recorder,
        results,
    )
    try:
        wait_for(lambda: service.unauthorized >= 3, 30, "three refused attempts")
        # said once
        assert recorder.holds == [
            ("authentication", "HTTP 401: the destination refused the credentials")
        ]
        assert (
            s.stats.held == "authentication"
            and len(s.pending()) == 2
            and recorder.deliveries == []
            and not list(s.dead.iterdir())
        )
        secret.write_text("right-token-5b1e\n")
        wait_for(lambda: len(recorder.deliveries) == 2, 30, "delivery with the mended token")
        assert recorder.holds[-1][0] is None and s.stats.held == ""
        assert service.stored == Counter(dict.fromkeys(uids_of(results), 1))
    finally:
        s.stop()
        service.stop()
    assert "token-" not in caplog.text


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, and a certificate it signed for 127.0.0.1 for each of the service and the node."""
    folder, openssl = tmp_path_factory.mktemp("pki"), require_tool("openssl")

    def run(*args) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        folder / "ca.key",
        "-out",
        folder / "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=dp-node test CA",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("service", "node"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            folder / f"{name}.key",
            "-out",
            folder / f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            folder / f"{name}.csr",
            "-CA",
            folder / "ca.pem",
            "-CAkey",
            folder / "ca.key",
            "-CAcreateserial",
            "-out",
            folder / f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            folder / "san.ext",
        )
    return {
        name: folder / name
        for name in ("ca.pem", "service.pem", "service.key", "node.pem", "node.key")
    }


def test_results_go_over_https_to_a_service_the_test_ca_vouches_for_with_the_node_certificate(
    tmp_path: Path, predictor, pki: dict[str, Path]
) -> None:
    service_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    service_side.load_cert_chain(pki["service.pem"], pki["service.key"])
    service_side.load_verify_locations(pki["ca.pem"])
    service_side.verify_mode = ssl.CERT_REQUIRED  # the node must show a certificate the CA signed
    service = StowService(tls=service_side).start()
    tls = {
        "cert": str(pki["node.pem"]),
        "key": str(pki["node.key"]),
        "ca": str(pki["ca.pem"]),
        "send": True,
    }
    node = start_node(tmp_path, predictor, destinations=[service.url], tls=tls, metrics_port=-1)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(
            "127.0.0.1",
            node.port,
            ae_title="DPNODE",
            tls_args=(ssl.create_default_context(cafile=str(pki["ca.pem"])), "127.0.0.1"),
        )
        assert assoc.is_established and int(assoc.send_c_store(chest_dataset()).Status) == 0
        assoc.release()
        wait_for(lambda: len(service.stored) == 2, 60, "the SR and the SC over https")
        assert set(service.client_names) == {"node"}
    finally:
        node.stop()
    # A sender that trusts only the system store refuses the service: nothing leaves.
    recorder = Recorder()
    untrusting = sender(tmp_path / "untrusting", WebDestination(service.url), recorder, [result(0)])
    try:
        wait_for(lambda: untrusting.stats.failed_associations >= 1, 30, "a refused TLS handshake")
        assert (
            "certificate not trusted" in untrusting.stats.last_error
            and recorder.deliveries == []
            and len(service.stored) == 2
        )
    finally:
        untrusting.stop()
        service.stop()
    with pytest.raises(ValueError, match="https:// when tls.send is true"):
        # and no cleartext beyond loopback once TLS is on
        NodeConfig(destinations=("http://pacs.example/dicom-web",), tls=TLSConfig(send=True))


# --- Orthanc with its DICOMweb plugin -------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path):
    plugin = require_file(DICOMWEB_PLUGIN, "orthanc-dicomweb")
    service = Orthanc(
        tmp_path / "orthanc",
        {"Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}},
        user=("dpnode", PASSWORD),
    )
    yield service.start()
    service.stop()


def in_orthanc(orthanc: Orthanc) -> Counter[str]:
    """The SOP Instance UIDs Orthanc stores, counted."""
    return Counter(
        instance["MainDicomTags"]["SOPInstanceUID"] for instance in orthanc.get("/instances?expand")
    )


def delivered(node) -> list[str]:
    """The results the node's audit trail says were delivered, one entry per delivery line."""
    return [
        uid
        for line in audit_lines(node)
        if line["event"] == "delivery" and line["status"] == "delivered"
        for uid in line["outputs"]
    ]


def expected_results(images: list[Dataset], predictor) -> set[str]:
    identities = [identity_of(ds, predictor.contract) for ds in images]
    return {
        uid
        for identity in identities
        for uid in (identity.instance_uid("sr"), identity.instance_uid("sc"))
    }


@pytest.mark.tools
def test_results_reach_orthanc_by_stow_rs_and_an_outage_loses_none_and_repeats_none(
    tmp_path: Path, predictor, orthanc: Orthanc
) -> None:
    secret = tmp_path / "pacs.secret"
    secret.write_text(PASSWORD + "\n")
    web = {
        "url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
        "auth": "basic",
        "user": "dpnode",
        "secret_file": str(secret),
    }
    node = start_node(
        tmp_path,
        predictor,
        destinations=[web],
        outbox={"initial_backoff_s": 0.2, "max_backoff_s": 1.0},
        metrics_port=-1,
    )
    images = [chest_dataset(seed=i) for i in range(3)]
    try:
        assert send(node.port, images[:1]) == [0]
        wait_for(
            lambda: set(in_orthanc(orthanc)) == expected_results(images[:1], predictor),
            60,
            "the SR and the SC in Orthanc",
        )
        modalities = sorted(
            series["MainDicomTags"]["Modality"] for series in orthanc.get("/series?expand")
        )
        # the overlay carries its radiograph's modality
        assert modalities == sorted([images[0].Modality, "SR"])
        orthanc.stop()  # down for a while: the node keeps what it makes
        assert send(node.port, images[1:]) == [0, 0]
        outbox = node.senders[0]
        wait_for(
            lambda: len(outbox.pending()) == 4 and outbox.stats.failed_associations >= 2,
            60,
            "four results waiting while Orthanc is down",
        )
        orthanc.start()  # the same storage
        expected = expected_results(images, predictor)
        wait_for(lambda: set(delivered(node)) == expected, 60, "every result delivered")
        # each result delivered once
        assert Counter(delivered(node)) == Counter(dict.fromkeys(expected, 1))
        assert in_orthanc(orthanc) == Counter(dict.fromkeys(expected, 1)) and outbox.pending() == []
    finally:
        node.stop()


@pytest.mark.tools
def test_a_wrong_password_holds_the_results_with_reason_authentication_and_never_shows_a_secret(
    tmp_path: Path,
    predictor,
    orthanc: Orthanc,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DP_TEST_PACS_PASSWORD", "not-the-password-2e8b")
    url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    web = {"url": url, "auth": "basic", "user": "dpnode", "secret_env": "DP_TEST_PACS_PASSWORD"}
    node = start_node(
        tmp_path,
        predictor,
        destinations=[web],
        outbox={"initial_backoff_s": 0.2, "max_backoff_s": 1.0},
        metrics_port=-1,
    )
    try:
        assert send(node.port, [chest_dataset()]) == [0]
        held = wait_for(
            lambda: [
                line
                for line in audit_lines(node)
                if line["event"] == "delivery" and line["status"] == "held"
            ],
            60,
            "the hold in the audit log",
        )
        assert [(line["destination"], line["reason"]) for line in held] == [(url, "authentication")]
        # the hold can come on the first result before the second is handed over: wait for both
        wait_for(lambda: len(node.senders[0].pending()) == 2, 30, "both results held")
        assert in_orthanc(orthanc) == Counter()
        assert any("authentication" in problem for problem in node.health()["problems"])
        # the counter follows the audit line (the trail is written first): read it once it moved
        wait_for(
            lambda: node.metrics.value("delivery_holds", destination=url, reason="authentication"),
            10,
            "the hold counted",
        )
        assert node.metrics.value("delivery_holds", destination=url, reason="authentication") == 1
        monkeypatch.setenv("DP_TEST_PACS_PASSWORD", PASSWORD)  # mended, no restart
        wait_for(
            lambda: len(delivered(node)) == 2,
            60,
            "the SR and the SC delivered once the password is right",
        )
        assert [line["status"] for line in audit_lines(node) if line["event"] == "delivery"] == [
            "held",
            "resumed",
            "delivered",
            "delivered",
        ]
        assert (
            in_orthanc(orthanc) == Counter(dict.fromkeys(delivered(node), 1))
            and node.health()["status"] == "ok"
        )
    finally:
        node.stop()
    shown = caplog.text + node.config.audit_path.read_text()
    assert "not-the-password" not in shown and PASSWORD not in shown
