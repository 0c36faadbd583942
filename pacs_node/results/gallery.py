"""The README's picture of what the node writes: the overlays of a real radiograph and of a
held-out phantom, side by side, from a bundle.

    python -m pacs_node.results.gallery --bundle runs/demo/bundle --out docs/node_overlay.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # PyTorch, pydicom and highdicom load after --help has been answered
    import numpy as np

    from pacs_node.model.predictor import NodePredictor


def overlay_pixels(predictor: NodePredictor, path: Path) -> np.ndarray:
    """The RGB overlay the node would send for the image at ``path``."""
    from pydicom import dcmread

    from pacs_node.config import NodeConfig
    from pacs_node.intake.sanitize import clean_source
    from pacs_node.model.predictor import prepare
    from pacs_node.results.identity import ResultIdentity, rendition
    from pacs_node.results.overlay import build_overlay

    source = dcmread(path)
    prepared = prepare(source, predictor.contract.image_size)
    (prediction,) = predictor.predict([prepared])
    clean = clean_source(source).dataset
    identity = ResultIdentity.of(
        clean, predictor.contract, rendition(NodeConfig(), predictor.contract)
    )
    sc = build_overlay(
        clean,
        source,
        prepared.source.pixels,
        prepared.on_source(prediction),
        predictor.contract,
        identity,
        1024,
    )
    return sc.pixel_array


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pacs_node.results.gallery", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--out", type=Path, default=Path("docs/node_overlay.png"))
    args = parser.parse_args(argv)
    from PIL import Image
    from pydicom.data import get_testdata_file

    from pacs_node.model.predictor import NodePredictor  # PyTorch: seconds, after the arguments

    chest = get_testdata_file("RG1_UNCR.dcm")  # a path; None without the pydicom-data package
    if not isinstance(chest, str):
        print("the gallery draws RG1_UNCR.dcm of pydicom-data: pip install pydicom-data")
        return 1
    predictor = NodePredictor(args.bundle, "cpu")
    images = [
        overlay_pixels(predictor, Path(chest)),
        overlay_pixels(predictor, min((args.bundle / "samples").glob("*.dcm"))),
    ]
    height = 720
    tiles = [
        Image.fromarray(image).resize((round(image.shape[1] * height / image.shape[0]), height))
        for image in images
    ]
    canvas = Image.new(
        "RGB", (sum(t.width for t in tiles) + 16 * (len(tiles) - 1), height), "white"
    )
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 16
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
