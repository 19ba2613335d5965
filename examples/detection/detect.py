"""The detection example end to end: export the trained detector to an int8 bundle, self-check it the way the
device does, detect shapes on generated images the model has not seen and draw them on a PNG.

    python examples/detection/detect.py [-o build/detection]

Prints the report's detection agreement (int8 vs fp32 after NMS), the self-check line, and the recall of
the int8 detections against the drawn shapes; writes OUT/detections.png (int8 boxes, labelled, on 8 images).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import CLASSES, generate  # noqa: E402

COLOURS = ((255, 60, 60), (60, 220, 60), (70, 120, 255))


def export(out: Path):
    import edgequant

    return edgequant.export(f"{HERE / 'model.py'}:build", HERE / "data", out=out, force=True, progress=False)


def detect(bundle_dir: Path, images: np.ndarray) -> list:
    """Bundle + images (n, 3, 64, 64) → detections per image, through the device adapter and the bundle's NMS."""
    sys.path.insert(0, str(bundle_dir))
    from edgequant_detect import decode
    from edgequant_runtime import Session

    sess = Session(bundle_dir)
    frames = (images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)  # as a camera gives them: H, W, RGB
    return [decode(sess.run(frame)[sess.output_names[0]][0]) for frame in frames]


def recall(dets: list, truth: list, iou: float = 0.5) -> float:
    """Fraction of the drawn shapes found with the right class at IoU ≥ ``iou``."""
    from edgequant_detect import Detections, match

    found = total = 0
    for d, t in zip(dets, truth):
        ref = Detections(t[:, :4], np.ones(len(t), np.float32), t[:, 4].astype(np.int64))
        found += match(ref, d, iou=iou)
        total += len(t)
    return found / max(total, 1)


def draw(images: np.ndarray, dets: list, path: Path, scale: int = 4) -> None:
    from PIL import Image, ImageDraw

    tiles = []
    for im, d in zip(images, dets):
        tile = Image.fromarray((im.transpose(1, 2, 0) * 255).astype(np.uint8)).resize((64 * scale, 64 * scale),
                                                                                       Image.NEAREST)
        pen = ImageDraw.Draw(tile)
        for (x1, y1, x2, y2), s, k in zip(d.boxes, d.scores, d.classes):
            colour = COLOURS[int(k) % len(COLOURS)]
            pen.rectangle([x1 * scale, y1 * scale, x2 * scale, y2 * scale], outline=colour, width=3)
            pen.text((x1 * scale + 3, max(0, y1 * scale - 11)), f"{CLASSES[int(k)]} {s:.2f}", fill=colour)
        tiles.append(tile)
    sheet = Image.new("RGB", (64 * scale * 4 + 30, 64 * scale * 2 + 10), (255, 255, 255))
    for i, tile in enumerate(tiles[:8]):
        sheet.paste(tile, ((i % 4) * (64 * scale + 10), (i // 4) * (64 * scale + 10)))
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path("build/detection"))
    args = ap.parse_args()
    bundle = export(args.out)
    print(bundle.report["detection"]["summary"])
    images, truth = generate(8, seed=1234)
    dets = detect(args.out, images)
    from edgequant_runtime import Session  # the bundle's copy: detect() put the bundle on the path

    sess = Session(args.out)
    print(sess.selftest().line())
    print(f"int8 recall of the drawn shapes (IoU >= 0.5, same class): {100 * recall(dets, truth):.1f}%")
    draw(images, dets, args.out / "detections.png")
    print(f"wrote {args.out / 'detections.png'}")


if __name__ == "__main__":
    main()
