"""Latency, throughput, receive rate and memory of the DICOM node, with dcmtk as the peers.

    python benchmarks/node_latency.py --bundle runs/demo/bundle        # or: make benchmark-node
    python benchmarks/node_latency.py --bundle runs/demo/bundle --device cuda --images 200

Runs ``dp-node`` as a process whose destination is dcmtk's ``storescp``, and sends it
copies of the real chest radiograph ``RG1_UNCR.dcm`` (1955 x 1841, 15-bit CR; each copy
with its own SOP Instance UID) with dcmtk's ``storescu``. It prints:

* latency: from the start of ``storescu`` to the SR stored at the destination, one image
  per second (targets on a 2-core CPU: p50 at most 0.20 s, p95 at most 0.30 s);
* sustained throughput with 4 concurrent ``storescu`` senders, images per second until
  every SR and SC is at the destination (target at least 7.5), and how long after the last
  image was processed its results were all stored (target: within 10 s);
* receive rate: the same files sent over one association to the node and to a plain
  ``storescp``, in the same run (target: the node at least as fast; the node fsyncs every
  image before it answers, storescp does not: the write-and-fsync time of one such file on
  the spool's disk is measured in the same run and the rate it allows printed beside it);
* the node's intake alone: lateral views of the same radiograph, which the node receives,
  fsyncs and acknowledges as any image and then screens out from the header, against a plain
  ``storescp`` (the receive rate above is measured while the node processes what it receives);
* start to listening and the memory held before the first image (targets 3 s, 450 MB);
* peak resident memory of the node process (target at most 1,000 MB);
* the node's CPU: milliseconds (user + system, all threads) per image in the throughput
  run and in the latency run, and its share of one core while idle, alone and with 4 associations held open.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dp_model.serving.bundle import load_bundle
from pacs_node.config import ENGINES, NodeConfig
from pacs_node.results.identity import ResultIdentity, rendition
from pacs_node.results.report import COMPREHENSIVE_3D_SR, sop_instance_uid_in


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(predicate, timeout: float, what: str, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise SystemExit(f"node_latency: timed out waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def copies(source: Path, folder: Path, count: int, **changes: str) -> list[Path]:
    """``count`` copies of ``source``, each a new instance (new SOP Instance UID), with the
    attributes in ``changes`` set."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"{i:05d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def node_config(
    work: Path,
    port: int,
    dest_port: int,
    bundle: Path,
    device: str,
    engine: str = "auto",
    associations: int = 1,
) -> Path:
    """The node's configuration: listening on ``port``, its spool in ``work``, its results to
    the storescp on ``dest_port`` over at most ``associations`` at once, its model run by
    ``engine``."""
    config = work / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "host": "127.0.0.1",
                "bundle": str(bundle),
                "spool": str(work / "spool"),
                "metrics_port": -1,
                "device": device,
                "engine": engine,
                "destinations": [f"RESULTS@127.0.0.1:{dest_port}"],
                "outbox": {"associations": associations},
            }
        )
    )
    return config


def storescp(
    folder: Path, port: int, fork: bool = False, max_pdu: int | None = None, keep: bool = True
) -> subprocess.Popen:
    """dcmtk's storescp; ``fork``: one process per association, so that several are served at
    once; ``max_pdu``: the largest PDU it announces (its default 16 kB, at most 128 kB);
    ``keep`` False: it takes every object and writes none (``--ignore``)."""
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            "storescp",
            "-aet",
            "RESULTS",
            "-od",
            str(folder),
            "+xa",
            *(["--fork"] if fork else []),
            *(["--max-pdu", str(max_pdu)] if max_pdu else []),
            *([] if keep else ["--ignore"]),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait(lambda: listening(port), 20, "storescp")
    return process


def storescu(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used."""
    user, system, _ = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float, int]:
    """CPU seconds in user space and in the kernel, and minor page faults, of the process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def fresh_write_cpu_ms(folder: Path, megabytes: int = 12, count: int = 3) -> float:
    """CPU ms to write and fsync a new file of ``megabytes`` (the overlay's size), median of
    ``count``: on this machine 3 ms while the kernel has recently freed pages at hand, about
    25 ms once new pages must come from memory the virtual machine has handed back (a few
    hundred MB written after files were last deleted); the state every other figure ran in."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(megabytes * 2**20)
    times = []
    for i in range(count):
        path = folder / f"fresh{i}.tmp"
        start = time.process_time()
        with path.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        times.append(time.process_time() - start)
    for i in range(count):
        (folder / f"fresh{i}.tmp").unlink()
    return 1000 * statistics.median(times)


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds of the whole machine since boot: (busy, all), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK"), sum(values) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's ended children (the storescu runs)."""
    times = os.times()
    return times.children_user + times.children_system


def idle_cpu_percent(pid: int, seconds: float = 3.0) -> float:
    """The share of one core the process uses over ``seconds`` with nothing sent to it."""
    before = cpu_s(pid)
    time.sleep(seconds)
    return 100 * (cpu_s(pid) - before) / seconds


def idle_associations_cpu_percent(pid: int, port: int, count: int) -> float:
    """:func:`idle_cpu_percent` while ``count`` associations to the node stay open, unused."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="DPNODE") for _ in range(count)]
    try:
        assert all(assoc.is_established for assoc in held), "the node refused an association"
        time.sleep(0.5)
        return idle_cpu_percent(pid)
    finally:
        for assoc in held:
            assoc.release()


def processed(audit: Path) -> int:
    """Images the node has finished (their audit line says processed)."""
    try:
        text = audit.read_text()
    except OSError:
        return 0
    return text.count('"status":"processed"')


def fsync_floor_ms(folder: Path, source: Path) -> float:
    """Median time to write and fsync a file of ``source``'s size in ``folder`` (the spool's
    disk): what acknowledging only what is on disk costs per image, which storescp does not pay."""
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    times = []
    for i in range(10):
        start = time.perf_counter()
        with (folder / f"fsync{i}.tmp").open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        times.append(time.perf_counter() - start)
        (folder / f"fsync{i}.tmp").unlink()
    return 1000 * statistics.median(times)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Expected(NamedTuple):
    """The SOP Instance UIDs of an image's results as storescp stores them."""

    sr_uid: str
    sc_uid: str


def expected(path: Path, contract) -> Expected:
    """``path``'s results at storescp, which takes Comprehensive 3D SR: the report arrives in
    that form, under the UID derived from the Comprehensive SR's."""
    identity = ResultIdentity.of(
        dcmread(path, stop_before_pixels=True), contract, rendition(NodeConfig(), contract)
    )
    return Expected(
        sop_instance_uid_in(identity.instance_uid("sr"), COMPREHENSIVE_3D_SR),
        identity.instance_uid("sc"),
    )


def arrived(folder: Path, uids: set[str]) -> bool:
    names = {p.name.split(".", 1)[1] for p in folder.iterdir() if "." in p.name}
    return uids <= names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latency-images", type=int, default=30)
    parser.add_argument(
        "--images", type=int, default=40, help="images for the throughput run (4 senders)"
    )
    parser.add_argument("--receive-images", type=int, default=20)
    parser.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="who runs the model (the node's engine): auto serves a bundle's ONNX graph without PyTorch",
    )
    parser.add_argument(
        "--associations",
        type=int,
        default=1,
        help="the node's outbox.associations; above 1 the destination storescp forks per association",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"node_latency: {tool} not found (Debian package dcmtk; make system-deps)"
            )
    contract = load_bundle(args.bundle)[1]
    work = Path(tempfile.mkdtemp(prefix="dp-node-bench-"))
    rg1 = Path(get_testdata_file("RG1_UNCR.dcm"))
    dest_port, node_port, plain_port = free_port(), free_port(), free_port()
    destination = storescp(work / "destination", dest_port, fork=args.associations > 1)
    config = node_config(
        work, node_port, dest_port, args.bundle, args.device, args.engine, args.associations
    )
    figures: dict[str, float] = {"fsync_floor_ms": fsync_floor_ms(work / "spool", rg1)}
    log = (work / "node.log").open("w")
    launched = time.perf_counter()
    node = subprocess.Popen(
        [sys.executable, "-m", "pacs_node.cli", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait(lambda: listening(node_port), 120, "the node")

        def identity(path: Path) -> Expected:
            return expected(path, contract)

        figures["start_to_listening_s"] = time.perf_counter() - launched
        figures["idle_rss_mb"] = rss_mb(node.pid)
        # Warm-up: the first image pays for lazy imports and allocator growth.
        warm = copies(rg1, work / "warm", 2)
        storescu(node_port, warm, "DPNODE")
        wait(
            lambda: arrived(work / "destination", {identity(p).sr_uid for p in warm}),
            120,
            "warm-up results",
        )

        figures["idle_cpu_percent"] = idle_cpu_percent(node.pid)
        figures["idle_4_associations_cpu_percent"] = idle_associations_cpu_percent(
            node.pid, node_port, 4
        )

        latencies = []
        cpu_before = cpu_s(node.pid)
        for path in copies(rg1, work / "latency", args.latency_images):
            sr = identity(path).sr_uid
            start = time.perf_counter()
            storescu(node_port, [path], "DPNODE")
            wait(lambda sr=sr: arrived(work / "destination", {sr}), 60, "an SR")
            latencies.append(time.perf_counter() - start)
            time.sleep(max(0.0, 1.0 - latencies[-1]))  # one image per second
        figures["cpu_ms_per_image_one_at_a_time"] = (
            1000 * (cpu_s(node.pid) - cpu_before) / args.latency_images
        )
        latencies.sort()
        figures["latency_p50_s"] = statistics.median(latencies)
        figures["latency_p95_s"] = latencies[int(0.95 * (len(latencies) - 1))]
        figures["latency_max_s"] = latencies[-1]

        batch = copies(rg1, work / "throughput", args.images)
        wanted = {uid for p in batch for uid in (identity(p).sr_uid, identity(p).sc_uid)}
        start = time.perf_counter()
        audit = work / "spool" / "audit.jsonl"
        before = processed(audit)
        figures["fresh_write_cpu_ms_before"] = fresh_write_cpu_ms(work / "probe")
        cpu_before, peers_before = cpu_s(node.pid), cpu_s(destination.pid) + children_cpu_s()
        split_before = cpu_split(node.pid)
        machine_before = machine_cpu_s()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: storescu(node_port, batch[i::4], "DPNODE"), range(4)))
        # the last image processed, then the last result at the destination: the outbox's lag
        wait(lambda: processed(audit) >= before + len(batch), 1200, "every image processed", 0.02)
        last_processed = time.perf_counter()
        wait(lambda: arrived(work / "destination", wanted), 1200, "every throughput result", 0.02)
        figures["cpu_ms_per_image"] = 1000 * (cpu_s(node.pid) - cpu_before) / len(batch)
        user, system, faults = (a - b for a, b in zip(cpu_split(node.pid), split_before))
        figures["cpu_user_ms_per_image"] = 1000 * user / len(batch)
        figures["cpu_system_ms_per_image"] = 1000 * system / len(batch)
        figures["minor_faults_per_image"] = faults / len(batch)
        figures["fresh_write_cpu_ms_after"] = fresh_write_cpu_ms(work / "probe")
        # where the two cores went meanwhile: the node, its peers (the four storescu and the
        # destination storescp; with --associations above 1 its forked children are not counted)
        peers = cpu_s(destination.pid) + children_cpu_s() - peers_before
        figures["peers_cpu_ms_per_image"] = 1000 * peers / len(batch)
        busy, total = (after - before for after, before in zip(machine_cpu_s(), machine_before))
        figures["machine_cpu_busy_fraction"] = busy / total
        figures["throughput_images_per_s"] = len(batch) / (time.perf_counter() - start)
        figures["outbox_drain_s"] = time.perf_counter() - last_processed

        same = copies(rg1, work / "receive", args.receive_images)
        plain = storescp(work / "plain", plain_port)
        to_plain = storescu(plain_port, same, "ANY-SCP")
        to_node = storescu(node_port, same, "DPNODE")
        plain.terminate()
        plain.wait(10)  # its port is taken again below
        figures["storescp_receive_images_per_s"] = len(same) / to_plain
        figures["node_receive_images_per_s"] = len(same) / to_node
        figures["node_to_storescp_receive_ratio"] = to_plain / to_node
        wait(
            lambda: arrived(work / "destination", {identity(p).sr_uid for p in same}),
            600,
            "the receive-rate results",
            0.05,
        )
        # The node's intake alone: lateral views, which it receives, fsyncs and acknowledges
        # as any image, then screens out from the header (no decoding, no model, no results),
        # so that its worker does not share the cores with the receiving meanwhile.
        lateral = copies(rg1, work / "lateral", args.receive_images, ViewPosition="LL")
        plain = storescp(work / "plain-lateral", plain_port)
        to_plain = storescu(plain_port, lateral, "ANY-SCP")
        to_node = storescu(node_port, lateral, "DPNODE")
        plain.terminate()
        plain.wait(10)
        # the node announces 1 MB PDUs; storescp at the largest it can announce (128 kB)
        plain = storescp(work / "plain-lateral-128k", plain_port, max_pdu=131072)
        to_plain_128k = storescu(plain_port, lateral, "ANY-SCP")
        plain.terminate()
        figures["intake_alone_storescp_128k_pdu_images_per_s"] = len(lateral) / to_plain_128k
        figures["intake_alone_storescp_images_per_s"] = len(lateral) / to_plain
        figures["intake_alone_node_images_per_s"] = len(lateral) / to_node
        figures["intake_alone_node_to_storescp_ratio"] = to_plain / to_node
        figures["node_peak_rss_mb"] = peak_rss_mb(node.pid)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        destination.terminate()
        log.close()
    f = figures
    floor = 1 / (1 / f["storescp_receive_images_per_s"] + f["fsync_floor_ms"] / 1000)
    lines = [
        f"node benchmark: RG1_UNCR.dcm (1955 x 1841 CR), model {contract.name} ({contract.image_size} px), device {args.device}, engine {args.engine}, {os.cpu_count()} CPUs",
        f"  latency storescu start -> SR at storescp, 1 image/s, n={args.latency_images}: p50 {f['latency_p50_s']:.2f} s, p95 {f['latency_p95_s']:.2f} s, max {f['latency_max_s']:.2f} s  (targets p50 <= 0.20 s, p95 <= 0.30 s)",
        f"  throughput, 4 concurrent senders, {args.images} images: {f['throughput_images_per_s']:.2f} images/s until every SR and SC is stored  (target >= 7.5)",
        f"  outbox lag: the last result stored {f['outbox_drain_s']:.2f} s after the last image processed  (target: drained within 10 s)",
        f"  receive rate, {args.receive_images} images on one association: node {f['node_receive_images_per_s']:.1f}/s, storescp {f['storescp_receive_images_per_s']:.1f}/s, ratio {f['node_to_storescp_receive_ratio']:.2f}  (target >= 1.0)",
        f"    write + fsync of one RG1-sized file on the spool's disk: {f['fsync_floor_ms']:.1f} ms; storescp's rate plus that per image: {floor:.1f}/s, ratio {floor / f['storescp_receive_images_per_s']:.2f} (the most one association allows while acknowledging only what is on disk)",
        f"  receive rate, the node's intake alone ({args.receive_images} lateral views it screens out, nothing to process): node {f['intake_alone_node_images_per_s']:.1f}/s, storescp {f['intake_alone_storescp_images_per_s']:.1f}/s, ratio {f['intake_alone_node_to_storescp_ratio']:.2f}; storescp announcing 128 kB PDUs {f['intake_alone_storescp_128k_pdu_images_per_s']:.1f}/s",
        f"  start to listening: {f['start_to_listening_s']:.2f} s  (target <= 3 s); idle before the first image {f['idle_rss_mb']:.0f} MB  (target <= 450 MB)",
        f"  node peak resident memory: {f['node_peak_rss_mb']:.0f} MB  (target <= 1000 MB)",
        f"  node CPU: {f['cpu_ms_per_image']:.0f} ms per image in the throughput run, {f['cpu_ms_per_image_one_at_a_time']:.0f} ms in the latency run (one a second, the idle second included); idle {f['idle_cpu_percent']:.1f} % of a core, {f['idle_4_associations_cpu_percent']:.1f} % with 4 associations open",
        f"  the two cores in the throughput run: {100 * f['machine_cpu_busy_fraction']:.0f} % busy; the node {f['cpu_ms_per_image']:.0f} ms of CPU per image, its peers (4 storescu, storescp) {f['peers_cpu_ms_per_image']:.0f} ms",
        f"    the node's CPU per image: user {f['cpu_user_ms_per_image']:.0f} ms, kernel {f['cpu_system_ms_per_image']:.0f} ms; {f['minor_faults_per_image']:.0f} new pages (minor faults) per image",
        f"    CPU to write and fsync a new 12 MB file, before / after the run: {f['fresh_write_cpu_ms_before']:.1f} / {f['fresh_write_cpu_ms_after']:.1f} ms (3 ms: recently freed pages at hand; about 25 ms: pages the virtual machine handed back)",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
