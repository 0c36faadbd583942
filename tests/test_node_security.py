"""Secure by default: who may connect, files only the service can read, bounded leftovers,
TLS that means it, weights that are what they claim, and a health check that tells the truth."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from node_support import (
    GatedPredictor,
    chest_dataset,
    final_lines,
    free_port,
    send,
    start_node,
    wait_for,
)

from dp_model.config import ConfigError, load_config
from dp_model.serving.bundle import BundleError, load_bundle
from pacs_node.cli import main
from pacs_node.config import NodeConfig, TLSConfig
from pacs_node.model.predictor import NodePredictor

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_configuration_names_who_may_connect_and_listens_on_loopback() -> None:
    shipped = load_config(NodeConfig, ROOT / "configs" / "node.yaml")
    assert shipped.allow and not shipped.allow_any_caller
    assert shipped.host == "127.0.0.1" and shipped.allow_networks == ("127.0.0.0/8", "::1/128")


def test_an_open_node_needs_an_explicit_setting() -> None:
    with pytest.raises(ConfigError, match="allow"):
        load_config(NodeConfig, None, {"allow": []})
    with pytest.raises(ConfigError, match="allow_networks"):
        load_config(NodeConfig, None, {"allow_networks": []})
    with pytest.raises(ConfigError, match="allow_networks"):
        load_config(NodeConfig, None, {"allow_networks": ["10.0.0.300/8"]})
    assert load_config(NodeConfig, None, {"allow": [], "allow_any_caller": True}).allow_any_caller


def test_an_open_node_says_so_at_start(
    tmp_path: Path, predictor: NodePredictor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    node = start_node(
        tmp_path,
        predictor,
        allow=(),
        allow_any_caller=True,
        host="0.0.0.0",
        allow_networks=("0.0.0.0/0",),
    )
    node.stop()
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "any calling AE title" in warnings and "cleartext" in warnings


def test_files_holding_patient_data_are_private_to_the_service(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    old = os.umask(0o022)  # a permissive umask, as many service accounts have
    try:
        down = f"RESULTS@127.0.0.1:{free_port()}"  # nobody listens: results stay in the outbox
        node = start_node(tmp_path, predictor, destinations=(down,))
        try:
            send(node.port, [chest_dataset(seed=1), chest_dataset(seed=2, BodyPartExamined="KNEE")])
            wait_for(lambda: len(final_lines(node)) == 2, 60, "both images handled")
            wait_for(
                lambda: len(list((tmp_path / "outbox").rglob("*.dcm"))) == 2,
                30,
                "two results in the outbox",
            )
        finally:
            node.stop()
        paths = [
            p
            for root in ("spool", "outbox", "dead-letter")
            for p in [tmp_path / root, *(tmp_path / root).rglob("*")]
        ]
        loose = {
            str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
            for p in paths
            if p.stat().st_mode & 0o077
        }
        assert loose == {}, loose
        names = {p.name for p in paths}
        # a skipped source and two results
        assert "audit.jsonl" in names and sum(name.endswith(".dcm") for name in names) >= 3
    finally:
        os.umask(old)


def held_bytes(folder: Path) -> int:
    """The bytes of the files in ``folder``, read while the node's pruner may delete some."""
    total = 0
    for path in folder.iterdir():
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # pruned between the listing and the stat
            continue
    return total


def test_skipped_and_failed_images_are_bounded_in_size_and_age(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    node = start_node(tmp_path, predictor, retention={"skipped_max_mb": 1, "skipped_days": 7})
    try:
        # 0.7 MB each
        knees = [
            chest_dataset(rows=600, columns=600, seed=i, BodyPartExamined="KNEE") for i in range(4)
        ]
        send(node.port, knees)
        wait_for(lambda: len(final_lines(node)) == 4, 60, "four skipped images")
        wait_for(
            lambda: held_bytes(node.spool.skipped) <= 2**20,
            30,
            "the size cap to be applied",
        )
        assert len(list(node.spool.skipped.glob("*.dcm"))) == 1  # the newest is kept
    finally:
        node.stop()
    old = next(node.spool.skipped.glob("*.dcm"))
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    again = start_node(tmp_path, predictor, retention={"skipped_max_mb": 1, "skipped_days": 7})
    again.stop()
    assert not old.exists()


def test_a_client_certificate_required_with_no_ca_file_uses_the_system_store(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
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
        ],
        check=True,
        capture_output=True,
    )
    node = start_node(
        tmp_path,
        predictor,
        tls=TLSConfig(cert=str(cert), key=str(key), require_client_cert=True, send=True),
    )
    node.stop()


def test_results_never_leave_in_cleartext_when_the_node_listens_with_tls(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="cleartext"):
        load_config(
            NodeConfig,
            None,
            {
                "tls.cert": str(tmp_path / "c.pem"),
                "tls.key": str(tmp_path / "c.pem"),
                "tls.send": False,
                "destinations": ["PACS@h:104"],
            },
        )


def test_a_bundle_whose_device_uid_does_not_match_its_weights_is_refused(
    tmp_path: Path, demo_bundle: Path
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy)
    path = copy / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["deep_pneumonia"]["device_uid"] = "2.25.1"
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="Device UID"):
        load_bundle(copy)
    meta["deep_pneumonia"]["device_uid"] = json.loads(
        (demo_bundle / "configs" / "metadata.json").read_text()
    )["deep_pneumonia"]["device_uid"]
    path.write_text(json.dumps(meta))
    state = torch.load(copy / "models" / "model.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1e-3  # retrained (or tampered) weights under the old identity
    torch.save(state, copy / "models" / "model.pt")
    with pytest.raises(BundleError, match="Device UID"):
        load_bundle(copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_asking_for_a_gpu_where_there_is_none_is_one_line(
    tmp_path: Path, demo_bundle: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "--bundle",
            str(demo_bundle),
            "--device",
            "cuda",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--spool",
            str(tmp_path / "spool"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "cuda" in err


def test_the_dockerfile_health_check_asks_the_node_itself(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    line = next(
        line
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip().startswith("CMD") and "health" in line
    )
    command = shlex.split(line.strip().removeprefix("CMD").strip())
    assert command[:3] == ["python", "-m", "pacs_node.health"]
    gated = GatedPredictor(predictor)
    node = start_node(tmp_path, gated, stall_after_s=1.0)
    try:
        env = os.environ | {"DP_NODE_METRICS_PORT": str(node.metrics_port)}

        def run():
            return subprocess.run(
                [sys.executable, *command[1:]], capture_output=True, text=True, env=env, timeout=60
            )

        healthy = run()
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        send(node.port, [chest_dataset()])  # the model never answers: the queue stops moving
        sick = wait_for(
            lambda: (lambda result: result if result.returncode != 0 else None)(run()),
            30,
            "the health check to fail",
        )
        assert (
            sick.returncode == 1
            and "Traceback" not in sick.stderr
            and "degraded" in sick.stdout + sick.stderr
        )
        gated.gate.set()
    finally:
        node.stop()


def test_metrics_are_prometheus_with_latency_histograms(
    tmp_path: Path, predictor: NodePredictor
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    node = start_node(tmp_path, predictor)
    try:
        send(node.port, [chest_dataset()])
        wait_for(lambda: len(final_lines(node)) == 1, 60, "the image")

        def scrape() -> str:
            url = f"http://127.0.0.1:{node.metrics_port}/metrics"
            return urllib.request.urlopen(url, timeout=10).read().decode()

        # The audit line and the counters are two observers of one outcome: the
        # scrape may come between them, so it is read again until the image shows.
        text = wait_for(
            lambda: (lambda t: t if "dp_node_processing_seconds_count 1.0" in t else None)(
                scrape()
            ),
            10,
            "the processed image in the histogram",
        )
    finally:
        node.stop()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["dp_node_processing_seconds"].type == "histogram"
    assert families["dp_node_inference_seconds"].type == "histogram"
    buckets = [
        s for s in families["dp_node_processing_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert len(buckets) >= 8 and buckets[-1].value == 1
    received = {s.name: s.value for s in families["dp_node_received"].samples}
    assert received["dp_node_received_total"] == 1


def test_a_flood_of_refusals_is_counted_in_the_audit_trail_not_written_line_by_line(
    tmp_path: Path,
) -> None:
    from pacs_node.audit import AuditLog, Bursts

    audit = AuditLog(tmp_path / "audit.jsonl")
    bursts = Bursts(audit, burst=10, window_s=0.5)
    for _ in range(25):
        bursts.write(
            "association",
            ("rejected", "network", "10.9.9.9"),
            status="rejected",
            reason="network",
            peer="10.9.9.9",
        )
    bursts.write(
        "association",
        ("rejected", "network", "10.9.9.8"),
        status="rejected",
        reason="network",
        peer="10.9.9.8",
    )
    time.sleep(0.6)
    bursts.flush()
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    flood = [line for line in lines if line["peer"] == "10.9.9.9"]
    assert (
        len(flood) == 11
        and flood[-1]["count"] == 15
        and sum(line.get("count", 1) for line in flood) == 25
    )
    # another peer is not held back by the flood
    assert [line for line in lines if line["peer"] == "10.9.9.8"] != []
