"""Configuration of the synthetic chest X-ray generator (``dp-synth``).

The defaults here are the embedded default; ``configs/synth.yaml`` lists every key with
its default value, and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import require as _check

#: The five classes, in index order: normal first (the majority), then the pneumonia
#: types from most to least frequent. Each has its own texture, size and location.
CLASSES = ("normal", "lobar", "bronchopneumonia", "interstitial", "cavitary")

#: Long-tailed class frequencies: the rarest class is about 1/20 of normal.
DEFAULT_CLASS_WEIGHTS = (1.0, 0.42, 0.24, 0.13, 0.05)

#: Generator versions: 1 is kept bit for bit so that published tables reproduce.
VERSIONS = (1, 2)

Layout = Literal["deep-pneumonia", "rsna", "csv"]
ImageFormat = Literal["dicom", "png"]


@dataclass(frozen=True, kw_only=True)
class Difficulty:
    """How hard the benchmark is. The defaults keep a plain ResNet18 well below 100%.

    Attributes:
        lesion_contrast: median density of lesions relative to the nominal texture (1.0 is
            an obvious lesion, 0.3 a barely visible one).
        contrast_spread: log-normal spread of the per-image lesion density; some lesions
            are then much fainter than the median.
        distractor_rate: mean number of lesion-like findings outside any box (granulomas,
            nipple shadows, ECG electrodes and wires, plate atelectasis, faint nodules),
            in every class, normal included.
        label_noise: fraction of images whose recorded label is wrong, as with human
            readers: lesion types confused with each other, lesions missed (recorded
            normal, boxes dropped) and normals over-called (recorded as a lesion, no box).
        pathology_overlap: probability that a lesion image also shows a faint lesion of
            another type (outside the boxes, not recorded), as real patients do.
        abnormality_rate: (version 2) share of images, in every class, with a finding that is
            abnormal but not pneumonia: cardiomegaly, a pleural effusion blunting a
            costophrenic angle, a pulmonary nodule or a band of atelectasis. The RSNA
            layout calls such an image without pneumonia "No Lung Opacity / Not Normal".
            Version 1 ignores it.
    """

    lesion_contrast: float = 0.55
    contrast_spread: float = 0.45
    distractor_rate: float = 1.6
    label_noise: float = 0.03
    pathology_overlap: float = 0.15
    abnormality_rate: float = 0.3

    def __post_init__(self) -> None:
        _check(
            0.0 < self.lesion_contrast <= 3.0, "lesion_contrast", self.lesion_contrast, "in (0, 3]"
        )
        _check(
            0.0 <= self.contrast_spread <= 2.0, "contrast_spread", self.contrast_spread, "in [0, 2]"
        )
        _check(
            0.0 <= self.distractor_rate <= 20.0,
            "distractor_rate",
            self.distractor_rate,
            "in [0, 20]",
        )
        _check(0.0 <= self.label_noise <= 0.5, "label_noise", self.label_noise, "in [0, 0.5]")
        _check(
            0.0 <= self.pathology_overlap <= 1.0,
            "pathology_overlap",
            self.pathology_overlap,
            "in [0, 1]",
        )
        _check(
            0.0 <= self.abnormality_rate <= 1.0,
            "abnormality_rate",
            self.abnormality_rate,
            "in [0, 1]",
        )


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What ``dp-synth`` generates.

    Attributes:
        num_images: how many images.
        size: side of the square images, in pixels (the paper's data: 1024).
        seed: master seed; image ``i`` depends only on ``(seed, i)`` and the settings, so
            results do not depend on the number of workers.
        version: the generator. 2 (the default) forms every image with a detector model
            whose window depends on the simulated device and patient, never on the image's
            content, adds noise that follows the anatomy and not the lesions, draws every
            pneumonia type's density, size and zone from shared, overlapping ranges (the
            types differ in pattern), records non-pneumonia abnormalities, and gives RSNA
            files their patients' ids. 1 draws exactly what the generator drew before
            version 2 existed: the data of the published tables (docs/results.md).
        layout: the dataset layout written (read back by ``dp_model.datasets``).
        image_format: DICOM CR/DX files or 8-bit PNG.
        class_weights: relative frequency of each class in :data:`CLASSES` order.
        monochrome1_fraction: share of DICOM images stored MONOCHROME1 (as CR often is).
        dx_fraction: share of DICOM images written as DX rather than CR.
        patients_per_image: average number of images per patient is 1 / this value;
            follow-up images of a patient share anatomy and the patient id.
        difficulty: see :class:`Difficulty`.
        workers: processes used; 0 for all cores.
    """

    num_images: int = 2000
    size: int = 1024
    seed: int = 0
    version: int = 2
    layout: Layout = "deep-pneumonia"
    image_format: ImageFormat = "dicom"
    class_weights: tuple[float, float, float, float, float] = DEFAULT_CLASS_WEIGHTS
    monochrome1_fraction: float = 0.3
    dx_fraction: float = 0.5
    patients_per_image: float = 0.8
    difficulty: Difficulty = field(default_factory=Difficulty)
    workers: int = 0

    def __post_init__(self) -> None:
        _check(
            1 <= self.num_images <= 10_000_000, "num_images", self.num_images, "in [1, 10000000]"
        )
        _check(64 <= self.size <= 4096, "size", self.size, "in [64, 4096]")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(self.version in VERSIONS, "version", self.version, f"one of {list(VERSIONS)}")
        _check(
            all(w >= 0 for w in self.class_weights) and sum(self.class_weights) > 0,
            "class_weights",
            self.class_weights,
            "non-negative, not all zero",
        )
        _check(
            0.0 <= self.monochrome1_fraction <= 1.0,
            "monochrome1_fraction",
            self.monochrome1_fraction,
            "in [0, 1]",
        )
        _check(0.0 <= self.dx_fraction <= 1.0, "dx_fraction", self.dx_fraction, "in [0, 1]")
        _check(
            0.0 < self.patients_per_image <= 1.0,
            "patients_per_image",
            self.patients_per_image,
            "in (0, 1]",
        )
        _check(self.workers >= 0, "workers", self.workers, ">= 0")
        if self.layout == "rsna" and self.image_format != "dicom":
            raise ValueError("the rsna layout holds DICOM files; set image_format: dicom")
