"""``dp-train``: train Deep Pneumonia and write a MONAI bundle (not available in this version)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "dp-train: training is not available in this version of Deep Pneumonia yet; "
        "`dp-synth` generates training data meanwhile",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
