"""Generator version 2's image formation: devices with fixed processing, noise from the anatomy.

Version 1 centred each image's window on a percentile of its own processed values,
stretched the result between two more percentiles, and made the quantum noise grow with
the attenuation that lesions added. A lesion then moved the window of the whole image
and announced itself in the noise, so the means and spreads of 16-pixel blocks read the
class without seeing any lesion.

Here the window and the processing belong to the simulated device (a few CR and DR
systems, each with its own settings) and the acquisition (exposure, and an automatic
exposure control that follows the patient's build), never to the pixels: the same
patient with and without a lesion is displayed alike outside the lesion. The quantum
noise follows the photon count behind the patient's anatomy, lesions left out, through
the slope of the device's tone curve, plus the detector's read-out noise, so that a
lesion adds density and pattern but not noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Anatomy
from .frame import resize, smooth, upsample_nearest

#: Attenuation per unit of the maps, for the detector's exponential law (as version 1).
MU = 2.0


@dataclass(frozen=True, kw_only=True)
class Device:
    """One simulated X-ray system's fixed processing.

    Attributes:
        name: a label, recorded in the truth table.
        damping: share of the large-scale variation the processing removes, so that lungs
            and mediastinum fit one window.
        reference: the level that damping pulls towards, in attenuation units.
        edges: gain of the unsharp mask that enhances edges.
        centre: the tone curve's centre for a patient of average build, processed units.
        width: the tone curve's width (smaller: more contrast).
        black: display value shown as black; ``white`` as white.
        photons: photons per 1024-px pixel behind no tissue at the nominal exposure.
        electronic: read-out noise, in output units.
    """

    name: str
    damping: float
    reference: float
    edges: float
    centre: float
    width: float
    black: float
    white: float
    photons: float
    electronic: float


#: The systems images come from, equally often.
DEVICES = (
    Device(
        name="CR-1",
        damping=0.35,
        reference=0.75,
        edges=0.25,
        centre=0.80,
        width=0.19,
        black=0.04,
        white=0.88,
        photons=2200.0,
        electronic=0.008,
    ),
    Device(
        name="CR-2",
        damping=0.5,
        reference=0.7,
        edges=0.45,
        centre=0.74,
        width=0.16,
        black=0.06,
        white=0.92,
        photons=1800.0,
        electronic=0.01,
    ),
    Device(
        name="DR-1",
        damping=0.45,
        reference=0.8,
        edges=0.3,
        centre=0.84,
        width=0.22,
        black=0.03,
        white=0.84,
        photons=4500.0,
        electronic=0.004,
    ),
    Device(
        name="DR-2",
        damping=0.55,
        reference=0.75,
        edges=0.55,
        centre=0.78,
        width=0.2,
        black=0.05,
        white=0.9,
        photons=3500.0,
        electronic=0.005,
    ),
)

#: Share of the patient's extra (or missing) thickness that automatic exposure control
#: makes up for; the rest shows as a brighter (darker) film.
AEC = 0.6


@dataclass(frozen=True)
class Acquisition:
    """One exposure: the device, its window for this patient, and the photon count."""

    device: Device
    centre: float
    width: float
    photons: float


def acquire(rng: np.random.Generator, anatomy: Anatomy) -> Acquisition:
    """Pick a device and set the exposure from the patient's build (not from the image)."""
    device = DEVICES[int(rng.integers(len(DEVICES)))]
    centre = device.centre + AEC * 0.7 * (anatomy.habitus - 1.0) + rng.normal(0.0, 0.03)
    width = device.width * rng.uniform(0.92, 1.08)
    return Acquisition(device, centre, width, device.photons * rng.uniform(0.7, 1.4))


def form_image(
    attenuation: np.ndarray,
    anatomy_only: np.ndarray,
    size: int,
    acquisition: Acquisition,
    rng: np.random.Generator,
) -> np.ndarray:
    """The processed, displayed image with noise, ``(size, size)`` float32 in ``[0, 1]``.

    Args:
        attenuation: everything the beam crossed, on the working grid.
        anatomy_only: the same without lesions, findings or distractors: what the noise
            follows.
    """
    device = acquisition.device
    processed = _process(attenuation, device, fine=True)
    display = _tone(processed, acquisition)
    # Noise: from the photons behind the anatomy alone, through the tone curve's slope there.
    base = _tone(_process(anatomy_only, device, fine=False), acquisition)
    photons = acquisition.photons * (1024.0 / size) ** 2
    sigma = (1.0 / MU) / np.sqrt(photons * np.exp(-MU * np.clip(anatomy_only, 0.0, None)))
    sigma *= base * (1.0 - base) / acquisition.width / (device.white - device.black)
    res = attenuation.shape[0]
    full = resize(display, size) if size != res else display
    full = (full - device.black) * np.float32(1.0 / (device.white - device.black))
    noise = rng.standard_normal(full.shape, dtype=np.float32)
    noise *= np.sqrt(
        upsample_nearest(sigma.astype(np.float32), size) ** 2 + np.float32(device.electronic**2)
    )
    full += noise
    return np.clip(full, 0.0, 1.0, out=full).astype(np.float32, copy=False)


def _process(attenuation: np.ndarray, device: Device, fine: bool) -> np.ndarray:
    processed = attenuation - device.damping * (smooth(attenuation, 24) - device.reference)
    if fine:
        processed += device.edges * (attenuation - smooth(attenuation, 4))
    return processed


def _tone(processed: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-(processed - acquisition.centre) / acquisition.width))).astype(
        np.float32
    )
