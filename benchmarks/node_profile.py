"""Where the node's time and memory go: a flame graph of images through ``dp-node`` and the
memory each import costs before the first image.

    python benchmarks/node_profile.py --bundle runs/demo/bundle      # or: make benchmark-profile

* **Memory before the first image**: a fresh interpreter imports the node's dependencies one
  after another and reads its resident set size (``VmRSS``) after each, then loads the
  bundle and starts a node; the increments are what each costs (a later import does not
  pay again for what an earlier one loaded).
* **Time per image**: after two warm-up images, ``py-spy record`` attaches to ``dp-node``
  (sampling, 200 Hz, every thread, idle waits left out; ``--gil``: only the thread holding
  the interpreter lock) while ``storescu`` sends copies of the real radiograph RG1 one at a
  time with the SR's arrival at ``storescp`` awaited each time (``--senders N``: N concurrent
  senders, every SR and SC awaited); the flame graph goes to ``docs/node_profile.svg`` and
  the samples, grouped by the step they fall in, to the printed table and ``--json``.

py-spy is a sampling profiler installed by ``make benchmark-profile`` into the venv (not a
runtime dependency of the node).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from node_latency import (
    arrived,
    copies,
    expected,
    free_port,
    listening,
    node_config,
    storescp,
    storescu,
    wait,
)
from pydicom.data import get_testdata_file

from dp_model.serving.bundle import load_bundle

#: Imported one after another in a fresh interpreter, in this order.
IMPORTS = (
    "numpy",
    "pydicom",
    "pynetdicom",
    "PIL.Image",
    "highdicom",
    "torch",
    "torchvision",
    "monai",
    "dp_transforms",
    "dp_model.serving.bundle",
    "pacs_node.node",
)

_MEMORY = """
import importlib, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
steps = [("python", rss())]
for name in sys.argv[2:]:
    importlib.import_module(name)
    steps.append((name, rss()))
from pacs_node.model.predictor import NodePredictor
NodePredictor(sys.argv[1], device="cpu")
steps.append(("bundle loaded", rss()))
print(json.dumps(steps))
"""

#: A sample belongs to the first step one of whose names is in its stack: start-up first
#: (an import anywhere below a frame is start-up, whoever imports), then the work of an image.
STEPS = (
    ("start-up: imports", ("<module> (",)),
    ("start-up: bundle", ("NodePredictor.__init__", "load_bundle")),
    ("SR", ("build_report", "ReportWriter.build")),
    ("overlay (SC)", ("build_overlay", "OverlayWriter.build")),
    ("presentation state (GSPS)", ("build_presentation_state", "PresentationWriter.build")),
    ("model", ("NodePredictor.predict", "Runner.run")),
    ("decode and letterbox", ("prepare (", "Pipeline._decode")),
    ("read and screen", ("Pipeline._read",)),
    ("receive, fsync, answer", ("listener.py",)),
    ("send results", ("DestinationSender", "cstore.py")),
)


def memory(bundle: Path) -> list[tuple[str, float]]:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY, str(bundle), *IMPORTS],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    steps = json.loads(out.strip().splitlines()[-1])
    return [(name, round(mb, 1)) for name, mb in steps]


#: A sample whose innermost frame is one of these is a thread waiting, not working.
WAITS = ("Condition.wait", "Event.wait", ".select (", "sleep (", "_PollLikeSelector")


def step_of(stack: str) -> str:
    frames = stack.split(";")
    if any(wait in frames[-1] for wait in WAITS):
        return "waiting"
    for step, needles in STEPS:
        if any(needle in frame for frame in frames for needle in needles):
            return step
    return "other"


def profile(
    bundle: Path,
    images: int,
    out_svg: Path,
    keep_raw: Path | None = None,
    senders: int = 1,
    gil: bool = False,
) -> dict[str, float]:
    """Images through a node under py-spy: one at a time, each SR awaited (``senders=1``), or
    ``senders`` concurrent ``storescu`` over all of them, every SR and SC awaited (the
    throughput run's shape). With ``gil``, py-spy samples only the thread holding the GIL,
    so the samples add up to the time the interpreter lock is held per image: the bound on
    throughput of the work that only one thread can do at a time."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("node_profile: py-spy not found (make benchmark-profile installs it)")
    contract = load_bundle(bundle)[1]
    work = Path(tempfile.mkdtemp(prefix="dp-node-profile-"))
    rg1 = Path(get_testdata_file("RG1_UNCR.dcm"))
    dest_port, node_port = free_port(), free_port()
    destination = storescp(work / "destination", dest_port)
    config = node_config(work, node_port, dest_port, bundle, "cpu")
    raw = work / "profile.txt"
    command = [sys.executable, "-m", "pacs_node.cli", "--config", str(config)]
    node = subprocess.Popen(command, stdout=(work / "node.log").open("w"), stderr=subprocess.STDOUT)
    recorder: subprocess.Popen | None = None
    try:
        wait(lambda: listening(node_port), 180, "the node to listen")
        # Warm-up, not recorded: the first images pay once for lazy imports, the tables
        # highdicom reads on first use and the allocator's growth.
        warm = copies(rg1, work / "warm", 2)
        storescu(node_port, warm, "DPNODE")
        wait(
            lambda: arrived(work / "destination", {expected(p, contract).sc_uid for p in warm}),
            120,
            "the warm-up results",
        )
        # One recording in raw (collapsed stacks); the SVG is drawn from the same samples.
        recorder = subprocess.Popen(
            [
                py_spy,
                "record",
                "--rate",
                "200",
                "--format",
                "raw",
                *(["--gil"] if gil else []),
                "-o",
                str(raw),
                "--pid",
                str(node.pid),
            ],
            stdout=(work / "py-spy.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        time.sleep(1.0)  # py-spy attached
        files = copies(rg1, work / "images", images)
        started = time.perf_counter()
        if senders == 1:
            for path in files:
                sr = expected(path, contract).sr_uid
                storescu(node_port, [path], "DPNODE")
                wait(lambda sr=sr: arrived(work / "destination", {sr}), 60, "the SR")
            seconds = time.perf_counter() - started
            time.sleep(2.0)  # the overlays still being sent
        else:
            wanted = {
                uid
                for p in files
                for uid in (expected(p, contract).sr_uid, expected(p, contract).sc_uid)
            }
            with ThreadPoolExecutor(senders) as pool:
                list(
                    pool.map(
                        lambda i: storescu(node_port, files[i::senders], "DPNODE"), range(senders)
                    )
                )
            wait(lambda: arrived(work / "destination", wanted), 600, "every SR and SC", 0.02)
            seconds = time.perf_counter() - started
    finally:
        if recorder is not None:
            recorder.send_signal(2)  # SIGINT: py-spy writes its file
            recorder.wait(120)
        node.terminate()
        node.wait(60)
        destination.terminate()
    by_step: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            by_step[step_of(stack)] += int(count)
    flamegraph(raw, out_svg)
    rate = 200.0
    waiting = by_step.pop("waiting", 0)
    result = {
        "images": images,
        "senders": senders,
        "sampled": "the thread holding the GIL" if gil else "every thread",
        "wall_s": round(seconds, 2),
        "samples": sum(by_step.values()),
        "waiting_samples": waiting,
        # start-up is paid once; the rest per image
        "cpu_ms_per_image": {
            step: round(count / rate / (1 if step.startswith("start-up") else images) * 1000, 1)
            for step, count in by_step.most_common()
        },
    }
    if keep_raw is not None:
        shutil.copyfile(raw, keep_raw)
    shutil.rmtree(work, ignore_errors=True)
    return result


def flamegraph(raw: Path, svg: Path) -> None:
    """An SVG flame graph of collapsed stacks (py-spy's ``raw`` format), drawn here: boxes
    as wide as their share of the samples, callers below callees."""
    tree: dict = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # the work of images: neither threads waiting nor the imports of the start
        if not stack or not count.isdigit() or step_of(stack) in ("waiting", "start-up: imports"):
            continue
        total += int(count)
        node = tree
        for frame in stack.split(";"):
            entry = node.setdefault(frame, [0, {}])
            entry[0] += int(count)
            node = entry[1]
    width, row = 1600.0, 16
    boxes: list[str] = []
    depth_max = [0]

    def draw(children: dict, x: float, depth: int) -> None:
        depth_max[0] = max(depth_max[0], depth)
        for frame, (count, grand) in sorted(children.items(), key=lambda kv: -kv[1][0]):
            w = width * count / max(total, 1)
            if w >= 1.0:
                name = frame.split(" (")[0]
                hue = 20 + (hash(name) % 40)
                label = name if w > 7 * len(name) else name[: max(0, int(w / 7) - 1)]
                boxes.append(
                    f"<g><title>{_escape(frame)}: {count} samples ({100 * count / total:.1f} %)</title>"
                    f'<rect x="{x:.1f}" y="{{y{depth}}}" width="{w:.1f}" height="{row - 1}" '
                    f'fill="hsl({hue},80%,60%)"/><text x="{x + 2:.1f}" y="{{t{depth}}}" '
                    f'font-size="11">{_escape(label)}</text></g>'
                )
                draw(grand, x, depth + 1)
            x += w

    draw(tree, 0.0, 0)
    height = (depth_max[0] + 2) * row
    body = "\n".join(boxes)
    for depth in range(depth_max[0] + 1):
        y = height - (depth + 1) * row
        body = body.replace(f"{{y{depth}}}", str(y)).replace(f"{{t{depth}}}", str(y + 12))
    svg.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="monospace">\n<text x="4" y="12" font-size="12">dp-node, {total} samples '
        f"at 200 Hz, every thread, waits and start-up imports left out (hover a box for its "
        f"share)</text>\n{body}\n</svg>\n"
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--svg", type=Path, default=Path("docs/node_profile.svg"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument(
        "--senders",
        type=int,
        default=1,
        help="1: one image at a time, each SR awaited; N: N concurrent storescu (throughput)",
    )
    parser.add_argument(
        "--gil", action="store_true", help="sample only the thread holding the interpreter lock"
    )
    parser.add_argument("--skip-memory", action="store_true", help="the time per image only")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    steps = [] if args.skip_memory else memory(args.bundle)
    if steps:
        print("memory before the first image (VmRSS after each step, fresh interpreter):")
    previous = 0.0
    for name, mb in steps:
        print(f"  {name:<18} {mb:7.0f} MB  (+{mb - previous:.0f})")
        previous = mb
    result = profile(args.bundle, args.images, args.svg, args.raw, args.senders, args.gil)
    shape = "one at a time" if args.senders == 1 else f"from {args.senders} concurrent senders"
    print(
        f"time per image, {result['images']} RG1 images {shape} "
        f"({result['wall_s']} s; CPU ms per image by step, {result['sampled']}; start-up once):"
    )
    for step, ms in result["cpu_ms_per_image"].items():
        print(f"  {step:<28} {ms:7.1f} ms")
    print(
        "  (sampled at 200 Hz by py-spy, which slows the node: compare the steps, not the totals)"
    )
    print(f"flame graph: {args.svg}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"memory_mb": steps, **result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
