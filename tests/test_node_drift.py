"""A real Prometheus, with the shipped alert rules, scrapes two nodes serving the demo model:
the one whose recent images are all pneumonia (a ward, not the validation population) raises
``DpNodeScoreDrift``, the one whose images are like the validation images raises nothing.

Most of each window is recorded through the node's own recording function (the outcome event
of a processed image, built from the bundle's saved test scores, as the node would have served
them); the last images of each go through the real node by C-STORE. The rules' ``for:`` is cut
to a second, and Prometheus scrapes and evaluates twice a second, so that this takes seconds."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
from helpers import require_tool
from node_support import final_lines, free_port, send_files, start_node, wait_for

from dp_model.serving.served import scores_path
from pacs_node.model.prediction import Prediction
from pacs_node.node import Node
from pacs_node.outcomes import Image, Processed

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 100


def served(node: Node, saved: np.lib.npyio.NpzFile, index: int) -> Processed:
    """The event of test image ``index`` processed by ``node``'s model (no pixels needed: its
    saved calibrated probabilities and out-of-distribution score)."""
    contract = node.predictor.contract
    triage = contract.triage_point
    prediction = Prediction(
        classes=contract.output_classes,
        probabilities=saved["probabilities"][index],
        normal_class=contract.normal_class,
        operating_point=contract.present_point.threshold,
        heatmap=np.zeros((2, 2)),
        boxes=np.zeros((0, 4)),
        multi_label=contract.multi_label,
        pneumonia=contract.pneumonia,
        triage_point=None if triage is None else triage.threshold,
        ood_score=None if contract.ood is None else float(saved["ood_score"][index]),
        ood_threshold=None if contract.ood is None else contract.ood.threshold,
    )
    assert np.isclose(prediction.pneumonia_probability, saved["pneumonia_probability"][index])
    return Processed(
        image=Image(sop_instance_uid=f"2.25.{index}"),
        prediction=prediction,
        model=contract,
        outputs=[],
        delivery="recorded by the test",
    )


def prometheus(tmp_path: Path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    """A started Prometheus on loopback scraping ``targets`` as job dp-node with the shipped
    rules, their ``for:`` cut to a second."""
    binary = require_tool("prometheus", "prometheus")
    rules = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    (tmp_path / "rules.yml").write_text(re.sub(r"for: \d+m", "for: 1s", rules))
    config = {
        "global": {
            "scrape_interval": "500ms",
            "scrape_timeout": "500ms",
            "evaluation_interval": "500ms",
        },
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [{"job_name": "dp-node", "static_configs": [{"targets": targets}]}],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    return process, f"http://{address}"


def api(url: str, path: str) -> list[dict]:
    with urllib.request.urlopen(url + path, timeout=5) as reply:
        answer = json.loads(reply.read())
    return answer["data"]["alerts"] if path.endswith("/alerts") else answer["data"]["result"]


def drift_alerts(url: str) -> list[dict]:
    return [a for a in api(url, "/api/v1/alerts") if a["labels"]["alertname"] == "DpNodeScoreDrift"]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_prometheus_fires_on_the_drifted_node_alone(
    tmp_path: Path, predictor, demo_bundle: Path
) -> None:
    started = time.monotonic()
    samples = sorted((demo_bundle / "samples").glob("*.dcm"))
    settings = {"bundle": str(demo_bundle), "drift_window": WINDOW}
    alike = start_node(tmp_path / "alike", predictor, **settings)
    drifted = start_node(tmp_path / "drifted", predictor, **settings)
    watcher = None
    try:
        assert drifted.watch.reference is not None, "the demo bundle carries its validation scores"
        rng = np.random.default_rng(0)
        with np.load(scores_path(demo_bundle, "test")) as saved:
            sick = np.flatnonzero(saved["labels"] != list(saved["classes"]).index("normal"))
            recorded = WINDOW - len(samples)
            for index in rng.choice(len(saved["labels"]), recorded, replace=False):
                alike.watch(served(alike, saved, int(index)))
            for index in rng.choice(sick, recorded, replace=False):
                drifted.watch(served(drifted, saved, int(index)))
        for node in (alike, drifted):
            assert set(send_files(node.port, samples)) == {0x0000}
            wait_for(
                lambda node=node: len(final_lines(node, "processed")) == len(samples),
                60,
                "the samples processed",
            )
        watcher, url = prometheus(
            tmp_path, [f"127.0.0.1:{n.metrics_port}" for n in (alike, drifted)]
        )
        wait_for(lambda: ready(url), 15, "Prometheus ready")
        firing = wait_for(
            lambda: [a for a in drift_alerts(url) if a["state"] == "firing"],
            20,
            "DpNodeScoreDrift firing",
        )
        assert [a["labels"]["instance"] for a in firing] == [f"127.0.0.1:{drifted.metrics_port}"]
        # the alike node was scraped and evaluated as often, with a full window, and stayed below
        distances = {
            r["metric"]["instance"]: float(r["value"][1])
            for r in api(url, "/api/v1/query?query=dp_node_drift_distance")
        }
        window = api(url, "/api/v1/query?query=dp_node_window_images")
        assert {float(r["value"][1]) for r in window} == {WINDOW}
        threshold = drifted.watch.bounds.distance
        assert (
            distances[f"127.0.0.1:{alike.metrics_port}"]
            < threshold
            < distances[f"127.0.0.1:{drifted.metrics_port}"]
        )
        assert [a["labels"]["instance"] for a in drift_alerts(url)] == [
            f"127.0.0.1:{drifted.metrics_port}"
        ]
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait(10)
        alike.stop()
        drifted.stop()
    assert time.monotonic() - started < 30


def test_every_series_the_dashboard_and_the_rules_name_is_one_a_node_serves(
    tmp_path: Path, predictor, demo_bundle: Path
) -> None:
    """A renamed gauge would leave a panel or an alert silently empty."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dp-node.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    named = set(re.findall(r"\bdp_node_\w+", " ".join(exprs) + rules))
    node = start_node(tmp_path, predictor, bundle=str(demo_bundle))
    try:
        with np.load(scores_path(demo_bundle, "test")) as saved:
            node.watch(served(node, saved, 0))
        with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics") as reply:
            served_names = set(re.findall(r"\bdp_node_\w+", reply.read().decode()))
    finally:
        node.stop()
    assert len(named) > 20
    assert named <= served_names, sorted(named - served_names)
