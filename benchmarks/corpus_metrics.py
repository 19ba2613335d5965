"""Task metrics of the conformance corpus: each → a fraction in [0, 1] comparing a quantized model's outputs with
fp32's on the same held-out inputs (higher is better), plus per-output SQNR.

Outputs arrive as lists (one entry per output) of arrays concatenated over the held-out feeds along axis 0.
"""

from __future__ import annotations

import numpy as np

from edgequant.check.metrics import cosine, sqnr_db

METRIC_NAMES = {"classify": "top-1 agreement", "segment": "mean IoU of argmax maps", "ssd": "anchor class agreement",
                "detect": "detection agreement (F1, IoU 0.5, same class)", "pose": "detection agreement (F1, IoU 0.5)",
                "ctc": "decoded strings equal to fp32", "textmap": "text-map IoU (p > 0.3)",
                "vad": "speech/non-speech agreement (p > 0.5)", "embed": "cosine of the first output",
                "lm": "next-token top-1 agreement", "generic": None}


def ctc_decode(probs: np.ndarray, characters: list[str]) -> list[str]:
    """(N, T, classes) CTC posteriors → greedy strings (blank 0, repeats merged; class k ≥ 1 is
    ``characters[k - 1]``, the last class a space, as PP-OCR's dictionary is laid out)."""
    table = ["", *characters, " "]
    out = []
    for seq in probs.argmax(-1):
        keep = [int(c) for i, c in enumerate(seq) if c != 0 and (i == 0 or c != seq[i - 1])]
        out.append("".join(table[c] if c < len(table) else "?" for c in keep))
    return out


def map_iou(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over classes present in either map of the IoU of their argmax regions (segmentation, (N, C, H, W))."""
    a, b = ref.argmax(1), got.argmax(1)
    ious = []
    for c in np.union1d(np.unique(a), np.unique(b)):
        inter, union = np.sum((a == c) & (b == c)), np.sum((a == c) | (b == c))
        ious.append(inter / union)
    return float(np.mean(ious))


def mask_iou(ref: np.ndarray, got: np.ndarray, threshold: float) -> float:
    a, b = ref > threshold, got > threshold
    union = np.sum(a | b)
    return 1.0 if union == 0 else float(np.sum(a & b) / union)


def _boxes(pred: np.ndarray, nc: int, conf: float = 0.25, iou: float = 0.45):
    """One YOLO head output (4 + nc + extra, anchors): rows 0–3 box cx, cy, w, h, rows 4… class scores → kept
    (boxes x1y1x2y2, classes) after per-class NMS."""
    scores = pred[4:4 + nc]
    cls, best = scores.argmax(0), scores.max(0)
    keep = np.nonzero(best > conf)[0]
    cx, cy, w, h = pred[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    order = np.argsort(-best[keep])
    chosen = []
    for i in order:
        if all(cls[keep[i]] != cls[keep[j]] or _iou(boxes[i], boxes[j]) <= iou for j in chosen):
            chosen.append(i)
    return boxes[chosen], cls[keep[chosen]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def detection_f1(ref: np.ndarray, got: np.ndarray, nc: int) -> float | None:
    """Per image: greedy one-to-one matches (IoU ≥ 0.5, same class) between the two models' detections; F1 over
    all images (None when neither model detects anything)."""
    matched = total = 0
    for r, g in zip(ref, got):
        (rb, rc), (gb, gc) = _boxes(r, nc), _boxes(g, nc)
        total += len(rb) + len(gb)
        used = set()
        for i in range(len(rb)):
            for j in range(len(gb)):
                if j not in used and rc[i] == gc[j] and _iou(rb[i], gb[j]) >= 0.5:
                    used.add(j)
                    matched += 1
                    break
    return None if total == 0 else 2 * matched / total


def task_metric(task: str, ref: list[np.ndarray], got: list[np.ndarray], meta: dict) -> float | None:
    """The task's agreement of ``got`` with ``ref`` (see METRIC_NAMES), or None where the task has none."""
    r, g = ref[0], got[0]
    if task == "classify":
        return float(np.mean(r.reshape(len(r), -1).argmax(-1) == g.reshape(len(g), -1).argmax(-1)))
    if task == "segment":
        return map_iou(r, g)
    if task == "ssd":
        return float(np.mean(ref[1].argmax(-1) == got[1].argmax(-1)))
    if task in ("detect", "pose"):
        return detection_f1(r, g, meta.get("nc", 80))
    if task == "ctc":
        chars = meta["characters"]
        return float(np.mean([a == b for a, b in zip(ctc_decode(r, chars), ctc_decode(g, chars))]))
    if task == "textmap":
        return mask_iou(r, g, 0.3)
    if task == "vad":
        return float(np.mean((r > 0.5) == (g > 0.5)))
    if task == "embed":
        return float(np.mean([cosine(a, b) for a, b in zip(r, g)]))
    if task == "lm":
        return float(np.mean(r.argmax(-1) == g.argmax(-1)))
    return None


def output_sqnr(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> dict[str, float]:
    """Per float output: SQNR in dB (rounded)."""
    out = {}
    for name, a, b in zip(names, ref, got):
        if a.dtype.kind == "f" and a.size and a.shape == b.shape:
            out[name] = round(float(sqnr_db(a.astype(np.float64), b.astype(np.float64))), 2)
    return out
