"""Synthetic chest X-rays in real dataset layouts (``dp-synth``).

No real chest X-ray dataset can be downloaded where this project is developed and
tested, so it makes its own: anatomically plausible frontal radiographs with five
long-tailed classes (normal and four pneumonia types), lesion boxes as radiologists
draw them, distractors and label noise, written as DICOM CR/DX or PNG in the layouts
that ``dp_model.datasets`` reads. Synthetic phantoms are for developing and testing
software, never for clinical use.
"""

from .config import CLASSES, Difficulty, SynthConfig
from .generate import generate

__all__ = ["CLASSES", "Difficulty", "SynthConfig", "generate"]
