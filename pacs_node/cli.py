"""``dp-node``: the DICOM node (not available in this version)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "dp-node: the DICOM node is not available in this version of Deep Pneumonia yet",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
