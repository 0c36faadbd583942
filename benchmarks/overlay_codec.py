"""What each lossless encoding of the overlay (the Secondary Capture) costs, from pixels to a peer.

For the overlay of the real ``RG1_UNCR.dcm`` (1955 x 1841 CR, a positive result with its heat
map and boxes) and of a 512 x 512 phantom, and for each candidate transfer syntax and encoder:

* encode: the pixel data's encoding alone, median of ``--repeats`` runs (ms);
* MB: the PS3.10 file as the outbox keeps it, and its time on a 1 Gb/s link (size / 125 MB/s);
* hand-over: what the node does with those bytes before and while sending, median of 5: the
  outbox's SHA-256 at hand-over, its fsynced write, the sender's read, its SHA-256 check and
  ``dcmread``, and the C-STORE itself over loopback to dcmtk's ``storescp`` (which also writes it);
* decode: pydicom's ``pixel_array`` equals the rendered pixels;
* dcmtk: ``dcm2pnm`` (3.6.7: JPEG, JPEG-LS and RLE built in) writes a PPM whose pixels equal
  them, and ``dcmdjpls`` / ``dcmdrle`` / ``dcmconv`` decompress the file.

Run: ``python benchmarks/overlay_codec.py [--bundle runs/demo/bundle]``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import os
import socket
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jpeg_ls
import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from dp_model.serving.bundle import load_bundle
from pacs_node.intake.sanitize import clean_source
from pacs_node.model.predictor import Prediction, prepare
from pacs_node.results.identity import ResultIdentity
from pacs_node.results.overlay import build_overlay


@dataclass(frozen=True)
class Candidate:
    name: str
    syntax: str
    encode: Callable[[np.ndarray], bytes]  # RGB -> the Pixel Data's value (one frame)
    photometric: str = "RGB"
    dcmtk: tuple[str, ...] = ()  # the dcmtk tool that draws it, then those that decompress it


def _jls(interleave: int) -> Callable[[np.ndarray], bytes]:
    def encode(rgb: np.ndarray) -> bytes:
        src = np.moveaxis(rgb, -1, 0) if interleave == 0 else rgb
        rows, columns = rgb.shape[:2]
        return bytes(jpeg_ls.encode_buffer(src.tobytes(), rows, columns, 3, 8, 0, interleave))

    return encode


def _pydicom(syntax: str, plugin: str, photometric: str = "RGB") -> Callable[[np.ndarray], bytes]:
    encoder = get_encoder(syntax)

    def encode(rgb: np.ndarray) -> bytes:
        rows, columns = rgb.shape[:2]
        return bytes(
            encoder.encode(
                rgb,
                rows=rows,
                columns=columns,
                samples_per_pixel=3,
                number_of_frames=1,
                bits_allocated=8,
                bits_stored=8,
                photometric_interpretation=photometric,
                pixel_representation=0,
                planar_configuration=0,
                encoding_plugin=plugin,
            )
        )

    return encode


def _deflated(data: bytes, level: int) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def _deflate(level: int) -> Callable[[np.ndarray], bytes]:
    def encode(rgb: np.ndarray) -> bytes:
        # the whole data set is deflated on writing (pydicom, at its own level: the file checked
        # is pydicom's); its pixels are nearly all of it, and their deflating is timed
        _deflated(rgb.tobytes(), level)
        return rgb.tobytes()

    return encode


CANDIDATES = (
    Candidate(
        "JPEG-LS lossless, sample interleave (pyjpegls: today)",
        JPEGLSLossless,
        _jls(2),
        dcmtk=("dcml2pnm", "dcmdjpls"),
    ),
    Candidate(
        "JPEG-LS lossless, line interleave (pyjpegls)",
        JPEGLSLossless,
        _jls(1),
        dcmtk=("dcml2pnm", "dcmdjpls"),
    ),
    Candidate(
        "JPEG-LS lossless, no interleave (pyjpegls)",
        JPEGLSLossless,
        _jls(0),
        dcmtk=("dcml2pnm", "dcmdjpls"),
    ),
    Candidate(
        "RLE lossless (pylibjpeg-rle)",
        RLELossless,
        _pydicom(RLELossless, "pylibjpeg"),
        dcmtk=("dcm2pnm", "dcmdrle"),
    ),
    Candidate(
        "RLE lossless (pydicom, numpy)",
        RLELossless,
        _pydicom(RLELossless, "pydicom"),
        dcmtk=("dcm2pnm", "dcmdrle"),
    ),
    Candidate(
        "Explicit VR Little Endian",
        ExplicitVRLittleEndian,
        lambda rgb: rgb.tobytes(),
        dcmtk=("dcm2pnm", "dcmconv"),
    ),
    Candidate(
        "Deflated Explicit VR LE (zlib 1)",
        DeflatedExplicitVRLittleEndian,
        _deflate(1),
        dcmtk=("dcm2pnm", "dcmconv"),
    ),
    Candidate(
        "Deflated Explicit VR LE (zlib 6, pydicom's)",
        DeflatedExplicitVRLittleEndian,
        _deflate(6),
        dcmtk=("dcm2pnm", "dcmconv"),
    ),
    Candidate(
        "JPEG 2000 lossless, YBR_RCT (openjpeg)",
        JPEG2000Lossless,
        _pydicom(JPEG2000Lossless, "pylibjpeg", photometric="YBR_RCT"),
        "YBR_RCT",
        ("dcm2pnm",),
    ),
)


def positive(shape: tuple[int, int]) -> Prediction:
    """A positive result with a heat map over the right lung and two regions (source pixels)."""
    rows, columns = shape
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    heat = np.exp(-((xx - 0.3) ** 2 + (yy - 0.55) ** 2) / 0.02).astype(np.float32)
    return Prediction(
        classes=("normal", "lobar", "bronchopneumonia", "interstitial", "cavitary"),
        probabilities=np.array([0.1, 0.6, 0.1, 0.1, 0.1]),
        normal_class="normal",
        operating_point=0.5,
        heatmap=heat,
        boxes=np.array([[0.15, 0.4, 0.45, 0.7], [0.55, 0.3, 0.8, 0.5]], np.float32)
        * np.array([columns, rows, columns, rows], np.float32),
        box_scores=(0.9, 0.7),
    )


def phantom(side: int) -> Dataset:
    ds = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    lungs = (np.abs(xx - side / 2) > side * 0.08) & (np.abs(xx - side / 2) < side * 0.4)
    lungs &= (yy > side * 0.15) & (yy < side * 0.8)
    pixels = np.where(lungs, 900, 2800) + rng.normal(0, 60, (side, side))
    ds.Rows = ds.Columns = side
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def median_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def as_file(sc: Dataset, candidate: Candidate, rgb: np.ndarray) -> bytes:
    ds = copy.deepcopy(sc)
    ds.file_meta.TransferSyntaxUID = candidate.syntax
    ds.PhotometricInterpretation = candidate.photometric
    data = candidate.encode(rgb)
    ds.PixelData = encapsulate([data]) if ds.file_meta.TransferSyntaxUID.is_encapsulated else data
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dcmtk_reads(path: Path, candidate: Candidate, rgb: np.ndarray) -> str:
    out = path.with_suffix(".ppm")
    out.unlink(missing_ok=True)
    drawer = candidate.dcmtk[0]
    done = subprocess.run([drawer, "--write-raw-pnm", str(path), str(out)], capture_output=True)
    if done.returncode or not out.exists():
        return f"{drawer} fails"
    raw = out.read_bytes()
    ppm = np.frombuffer(raw[len(raw) - rgb.size :], np.uint8).reshape(rgb.shape)
    said = f"{drawer} identical" if np.array_equal(ppm, rgb) else f"{drawer} DIFFERS"
    for tool in candidate.dcmtk[1:]:
        ok = subprocess.run([tool, str(path), str(path.with_suffix(".out"))], capture_output=True)
        said += f", {tool} {'ok' if ok.returncode == 0 else 'fails'}"
    return said


def storescp(folder: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        ["storescp", "-aet", "RESULTS", "-od", str(folder), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.1)
    raise SystemExit("storescp did not start")


def hand_over_ms(data: bytes, syntax: str, folder: Path, port: int) -> float:
    """Outbox put, sender's read and check, and the C-STORE, as the node does them."""
    ae = AE(ae_title="DPNODE")
    ae.add_requested_context(SecondaryCaptureImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="RESULTS")
    assert assoc.is_established
    path = folder / "entry.dcm"

    def once() -> None:
        digest = hashlib.sha256(data).hexdigest()
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        back = path.read_bytes()
        assert hashlib.sha256(back).hexdigest() == digest
        status = assoc.send_c_store(dcmread(io.BytesIO(back)))
        assert status and status.Status == 0, status

    try:
        return median_ms(once, 5)
    finally:
        assoc.release()


def measure(title: str, received: Dataset, contract, repeats: int, work: Path) -> None:
    clean = clean_source(received).dataset
    prepared = prepare(received, contract.image_size, max_side=2048)
    prediction = prepared.on_source(positive(prepared.source_shape))
    identity = ResultIdentity.of(clean, contract, "benchmark")
    build = lambda: build_overlay(  # noqa: E731
        clean, received, prepared.source.pixels, prediction, contract, identity, 2048
    )
    sc = build()
    rgb = sc.pixel_array
    print(f"\n{title}: overlay {rgb.shape[1]} x {rgb.shape[0]} RGB, {rgb.nbytes / 1e6:.2f} MB raw")
    print("| codec | encode ms | MB | 1 Gb/s ms | hand-over + C-STORE ms | decode check | dcmtk |")
    print("|---|---|---|---|---|---|---|")
    process, port = storescp(work / "received")
    try:
        for candidate in CANDIDATES:
            encode = median_ms(lambda c=candidate: c.encode(rgb), repeats)
            data = as_file(sc, candidate, rgb)
            size = len(data)
            if "zlib" in candidate.name:  # the size at the level timed
                size = len(as_file(sc, CANDIDATES[5], rgb)) - rgb.nbytes
                size += len(_deflated(rgb.tobytes(), int(candidate.name.split("zlib ")[1][0])))
            path = work / "candidate.dcm"
            path.write_bytes(data)
            back = dcmread(path)
            identical = np.array_equal(back.pixel_array, rgb)
            moved = hand_over_ms(data, candidate.syntax, work, port)
            print(
                f"| {candidate.name} | {encode:.0f} | {size / 1e6:.2f} | {size / 125e3:.0f}"
                f" | {moved:.0f} | {'identical' if identical else 'DIFFERS'} | {dcmtk_reads(path, candidate, rgb)} |"
            )
    finally:
        process.terminate()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=Path(os.environ.get("DP_TEST_BUNDLE", "runs/demo/bundle"))
    )
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    contract = load_bundle(args.bundle)[1]
    print(f"overlay codecs, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="dp-overlay-codec-") as folder:
        work = Path(folder)
        (work / "received").mkdir()
        measure(
            "RG1_UNCR.dcm (1955 x 1841 CR)",
            dcmread(get_testdata_file("RG1_UNCR.dcm")),
            contract,
            args.repeats,
            work,
        )
        measure("phantom 512 x 512", phantom(512), contract, args.repeats, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
