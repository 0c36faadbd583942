"""How long the node takes to build one Structured Report (``build_report``), median of N.

    python benchmarks/report_speed.py --bundle runs/demo/bundle
    python benchmarks/report_speed.py --bundle runs/demo/bundle --before /tmp/old-checkout

The report of a positive image with two regions on the real chest radiograph
``RG1_UNCR.dcm`` (cleaned as the node cleans what it receives). With ``--before``, the same
measurement also runs on the code of another checkout (its ``pacs_node``, ``dp_model`` and
``transforms``), the two taking turns in separate processes, so that both figures come from
one run on one machine in the same state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def measure(bundle: Path, runs: int) -> dict[str, float]:
    """Milliseconds per report: median and fastest of ``runs``, after a few to warm up."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from dp_model.serving.bundle import load_bundle
    from pacs_node.config import NodeConfig
    from pacs_node.intake.sanitize import clean_source
    from pacs_node.model.prediction import Prediction
    from pacs_node.results.identity import ResultIdentity, rendition
    from pacs_node.results.report import build_report

    contract = load_bundle(bundle)[1]
    source = clean_source(dcmread(get_testdata_file("RG1_UNCR.dcm"))).dataset
    chosen = next(i for i, c in enumerate(contract.classes) if c != contract.normal_class)
    probabilities = np.full(len(contract.classes), 0.05)
    probabilities[chosen] = 1.0 - 0.05 * (len(contract.classes) - 1)
    prediction = Prediction(
        classes=contract.classes,
        probabilities=probabilities,
        normal_class=contract.normal_class,
        operating_point=0.5,
        heatmap=np.zeros((7, 7), np.float32),
        boxes=np.array([[300, 400, 900, 1200], [1000, 300, 1500, 900]], np.float32),
        box_scores=(0.83, 0.71),
    )
    identity = ResultIdentity.of(source, contract, rendition(NodeConfig(), contract))
    for _ in range(5):
        build_report(source, prediction, contract, identity)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        build_report(source, prediction, contract, identity)
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "fastest_ms": min(times)}


def in_process(tree: Path | None, bundle: Path, runs: int) -> dict[str, float]:
    """:func:`measure` in a fresh Python, on the code of ``tree`` (None: this checkout)."""
    env = dict(os.environ)
    if tree is not None:
        pp = tree / ".pp"
        pp.mkdir(exist_ok=True)
        link = pp / "dp_transforms"
        if not link.exists():
            link.symlink_to(tree / "transforms")
        env["PYTHONPATH"] = f"{pp}{os.pathsep}{tree}"
    done = subprocess.run(
        [sys.executable, __file__, "--bundle", str(bundle), "--runs", str(runs), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--before", type=Path, help="a checkout to measure in turns with this one")
    parser.add_argument("--rounds", type=int, default=3, help="turns each, with --before")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(measure(args.bundle, args.runs)))
        return 0
    if args.before is None:
        found = measure(args.bundle, args.runs)
        print(
            f"build_report: median {found['median_ms']:.1f} ms, fastest {found['fastest_ms']:.1f} ms"
        )
        return 0
    figures: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, tree in (("before", args.before), ("after", None)):
            figures[name].append(in_process(tree, args.bundle, args.runs)["median_ms"])
    for name, medians in figures.items():
        print(
            f"{name:6s} build_report median of {args.runs}: "
            + ", ".join(f"{m:.1f}" for m in medians)
            + f" ms (per round; middle {statistics.median(medians):.1f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
