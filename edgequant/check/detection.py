"""Detection agreement: fp32 and int8 outputs of a YOLO-style head → the device's reference NMS on both
(``runtimes/python/edgequant_detect.py``) → matched boxes (IoU ≥ 0.5, same class), folded batch by batch.

agreement = 2·matched / (fp32 boxes + int8 boxes) (the F1 of int8 against fp32 as ground truth);
recall = matched / fp32 boxes. Where fp32 finds nothing on any held-out image, nothing can be compared:
the entry says so (status ``empty``) instead of a figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..graph.sessions import batches, input_dtypes, session

__all__ = ["CONF", "IOU_MATCH", "IOU_NMS", "detection_agreement", "yolo_output"]

CONF, IOU_NMS, IOU_MATCH = 0.25, 0.45, 0.5


def yolo_output(plan: dict) -> bool:
    """A head (``HeadPlan.to_dict()``, quantize/heads.py) → whether its output is (4 boxes + classes, anchors):
    a Concat of a 4-row box part and a score part along axis 1."""
    parts = [tuple(p) for p in plan.get("parts", [])]
    return len(parts) == 2 and parts[0] == (0, 4) and parts[1][1] > 4


def detection_agreement(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]],
                        output: str, *, batch_size: int = 16, conf: float = CONF, level: str = "all") -> dict:
    """Both models on ``samples`` → the detection agreement entry of the report."""
    from .._runtime.edgequant_detect import decode, match
    s_ref, s_q = session(fp32, arena=False), session(int8, level=level, arena=False)
    dtypes = input_dtypes(s_ref)
    n_ref = n_q = matched = images = with_dets = 0
    for batch in batches(samples, batch_size, dtypes):
        (ref,), (q,) = s_ref.run([output], batch), s_q.run([output], batch)
        for r, t in zip(ref, q):
            a = decode(r, conf=conf, iou=IOU_NMS)
            b = decode(t, conf=conf, iou=IOU_NMS)
            images += 1
            with_dets += bool(len(a.boxes))
            n_ref, n_q = n_ref + len(a.boxes), n_q + len(b.boxes)
            matched += match(a, b, iou=IOU_MATCH)
    entry = {"output": output, "images": images, "images_with_fp32_detections": with_dets,
             "fp32_detections": n_ref, "int8_detections": n_q, "matched": matched, "conf": conf,
             "iou_nms": IOU_NMS, "iou_match": IOU_MATCH}
    if n_ref == 0:
        entry.update(status="empty", agreement=None, recall=None,
                     summary=f"fp32 finds no box at score >= {conf} on any of {images} held-out images: "
                             "detection agreement cannot be checked")
        return entry
    agreement = 2 * matched / (n_ref + n_q)
    entry.update(status="ok", agreement=round(agreement, 6), recall=round(matched / n_ref, 6),
                 summary=f"{output}: detection agreement {100 * agreement:.1f}% ({matched} of {n_ref} fp32 boxes "
                         f"matched at IoU >= {IOU_MATCH}, same class; int8 finds {n_q}) on {images} held-out images")
    return entry
