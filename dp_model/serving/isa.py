"""The CPU's integer instructions an 8-bit graph was validated with, and whether this CPU has them.

ONNX Runtime's 8-bit convolutions take another path on a CPU with VNNI (``avx512_vnni``,
``avx_vnni``, ``amx_int8``: 8-bit products summed in 32 bits) than on one without (AVX2's
``pmaddubsw``, whose 16-bit intermediate sums can saturate). The same graph can therefore give
other numbers, and other decisions, on the other kind of CPU. :mod:`dp_model.serving.quantized`
records the kind it validated on (``models/model.int8.json``, ``cpu``); the runner refuses to
serve the 8-bit graph on the other kind (:func:`int8_mismatch`).
"""

from __future__ import annotations

import json
from pathlib import Path

#: The flags (``/proc/cpuinfo``) that change the path of 8-bit arithmetic, and what it rests on.
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
RECORDED = ("avx2", "avx512bw", *VNNI)


def int8_features(cpuinfo: str | None = None) -> list[str]:
    """This CPU's flags among :data:`RECORDED` (from ``/proc/cpuinfo``; [] where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return [flag for flag in RECORDED if flag in flags]


def int8_mismatch(record_file: Path, here: list[str] | None = None) -> str:
    """Why the 8-bit graph of ``record_file`` (``models/model.int8.json``) must not serve on this
    CPU ("": it may): validated with VNNI and served without, or the reverse. A record that
    names no CPU (written before it was recorded) is not refused."""
    try:
        validated = json.loads(record_file.read_text()).get("cpu", {}).get("int8_features")
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(validated, list):
        return ""
    here = int8_features() if here is None else here
    then = [flag for flag in validated if flag in VNNI]
    now = [flag for flag in here if flag in VNNI]
    if bool(then) == bool(now):
        return ""
    return (
        f"it was validated on a CPU {'with ' + ', '.join(then) if then else 'without VNNI'} and this "
        f"one is {'with ' + ', '.join(now) if now else 'without VNNI'}: ONNX Runtime's 8-bit arithmetic "
        "takes another path there, its decisions were not compared (train again on this kind of CPU, "
        "or serve the float graph)"
    )
