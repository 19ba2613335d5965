"""Reference post-processing for detection bundles: a YOLO-style output → boxes, scores, classes after
non-maximum suppression, and the agreement of two sets of detections. numpy only (runs on the device next to
edgequant_runtime.py); the export uses the same code to report detection agreement, so the figure in the
report is the one this file reproduces.

Output layouts (the bundle's manifest names its own under ``detection.layout``):
- ``"v8"`` (ultralytics v8/v11 export, and examples/detection): one image's output is (4 + C, A): per anchor A,
  box centre x, y, width, height in input pixels, then C class scores in 0–1;
- ``"v5"`` (ultralytics v5 export): one image's output is (A, 4 + 1 + C): per anchor the box, its objectness,
  then C class scores; a detection's score is objectness × class score.

    dets = decode(output[0], conf=0.25, iou=0.45, layout="v8")  # Detections(boxes (K, 4) x1y1x2y2, scores, classes)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Detections", "decode", "match", "nms"]

MAX_ANCHORS = 1_000_000
LAYOUTS = ("v8", "v5")


class Detections(NamedTuple):
    boxes: np.ndarray  # (K, 4) float32, x1 y1 x2 y2
    scores: np.ndarray  # (K,) float32
    classes: np.ndarray  # (K,) int64


def decode(output: np.ndarray, *, conf: float = 0.25, iou: float = 0.45, max_det: int = 300,
           layout: str = "v8") -> Detections:
    """One image's output in ``layout`` (see the module docstring) → its detections: best class per anchor,
    score ≥ ``conf``, then class-aware NMS at ``iou``, at most ``max_det``, highest score first. Raises
    ValueError on an unknown layout, an output that is not of that layout, or NaN/Inf (the output is untrusted,
    like the frames)."""
    if layout not in LAYOUTS:
        raise ValueError(f"detection layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    out = np.asarray(output)
    if layout == "v5":
        if out.ndim != 2 or out.shape[1] < 6 or not 0 < out.shape[0] <= MAX_ANCHORS:
            raise ValueError(f"v5 detection output must be (anchors, 4 + 1 + classes), got shape {out.shape}")
        out = out.T
    elif out.ndim != 2 or out.shape[0] < 5 or not 0 < out.shape[1] <= MAX_ANCHORS:
        raise ValueError(f"v8 detection output must be (4 + classes, anchors), got shape {out.shape}")
    out = out.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ValueError("detection output holds NaN or Inf")
    scores_all = out[5:] * out[4:5] if layout == "v5" else out[4:]
    classes = scores_all.argmax(axis=0)
    scores = scores_all[classes, np.arange(out.shape[1])]
    keep = scores >= conf
    if not keep.any():
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    xywh, scores, classes = out[:4, keep].T, scores[keep], classes[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    order = nms(boxes, scores, iou, classes=classes)[:max_det]
    return Detections(boxes[order], scores[order], classes[order].astype(np.int64))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K, 4) and (M, 4) x1y1x2y2 boxes → (K, M) intersection over union."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, *, classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression → indices kept, highest score first. With ``classes``, boxes of
    different classes never suppress each other."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    suppressed = np.zeros(len(order), bool)
    ious = iou_matrix(boxes[order], boxes[order]) if len(order) <= 4096 else None
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        row = ious[i] if ious is not None else iou_matrix(boxes[order[i:i + 1]], boxes[order])[0]
        hit = row > iou
        if classes is not None:
            hit &= classes[order] == classes[order[i]]
        suppressed |= hit
    return np.asarray(keep, dtype=np.int64)


def match(ref: Detections, test: Detections, *, iou: float = 0.5) -> int:
    """Two detection sets → how many of ``ref``'s boxes (highest score first) find a distinct ``test`` box of
    the same class at IoU ≥ ``iou``."""
    if not len(ref.boxes) or not len(test.boxes):
        return 0
    ious = iou_matrix(ref.boxes, test.boxes)
    ious[ref.classes[:, None] != test.classes[None, :]] = 0.0
    used = np.zeros(len(test.boxes), bool)
    matched = 0
    for i in range(len(ref.boxes)):
        row = np.where(used, 0.0, ious[i])
        j = int(row.argmax())
        if row[j] >= iou:
            used[j] = True
            matched += 1
    return matched
