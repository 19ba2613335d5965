"""Detection agreement: fp32 and int8 outputs of a YOLO-style head → the device's reference NMS on both
(``runtimes/python/edgequant_detect.py``) → matched boxes (IoU ≥ 0.5, same class), folded batch by batch.

The head's layout is read from the graph (quantize/heads.py's plan: the output axis its Concat built, the
pieces along it), never assumed:
- ``v8`` (ultralytics v8/v11): a 3-D output (N, 4 + C, A) whose axis 1 joins 4 box rows and C class-score rows;
- ``v5`` (ultralytics v5): a 3-D output (N, A, 4 + 1 + C) whose last axis joins 4 box columns and the
  sigmoid columns of objectness and C classes (per detection level, the levels joined along the anchor axis);
  a detection's score is objectness × class score;
- anything else that mixes ranges (also a v8 segmentation or pose head, whose mask coefficients or keypoints
  follow the scores) is not decoded: the report says so in one line.

agreement = 2·matched / (fp32 boxes + int8 boxes) (the F1 of int8 against fp32 as ground truth);
recall = matched / fp32 boxes. Where fp32 finds nothing on any held-out image, nothing can be compared:
the entry says so (status ``empty``) instead of a figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..graph.sessions import batches, input_dtypes, session

__all__ = ["CONF", "IOU_MATCH", "IOU_NMS", "detection_agreement", "detection_layout", "unsupported"]

CONF, IOU_NMS, IOU_MATCH = 0.25, 0.45, 0.5


def detection_layout(plan: dict) -> str | None:
    """A head (``HeadPlan.to_dict()``, quantize/heads.py) → ``"v8"``, ``"v5"`` (see the module docstring) or
    None: 4 box values first (one piece or several adding up to 4), then exactly one piece of scores. A third
    kind of piece (segmentation mask coefficients, pose keypoints) is neither."""
    parts = [tuple(p) for p in plan.get("parts", [])]
    ends = [b for _, b in parts]
    if plan.get("rank") != 3 or not parts or parts[0][0] != 0 or 4 not in ends or ends.index(4) != len(ends) - 2:
        return None
    scores = ends[-1] - 4
    if plan.get("axis") == 1 and scores >= 1:
        return "v8"
    if plan.get("axis") == 2 and scores >= 2:
        return "v5"
    return None


def unsupported(plan: dict) -> dict:
    """A mixed-range head whose layout is neither v8 nor v5 → the report's detection entry saying so."""
    return {"output": plan["output"], "status": "unsupported", "agreement": None, "recall": None,
            "summary": f"output {plan['output']!r} joins parts {plan.get('parts')} of different ranges along axis "
                       f"{plan.get('axis')}, which is neither a v8/v11 (N, 4+C, anchors) nor a v5 (N, anchors, "
                       "4+1+C) detection layout: detection agreement is not measured and edgequant_detect.py does "
                       "not decode it"}


def detection_agreement(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]],
                        output: str, *, layout: str = "v8", batch_size: int = 16, conf: float = CONF,
                        level: str = "all") -> dict:
    """Both models on ``samples`` → the detection agreement entry of the report (``layout``: "v8" or "v5")."""
    from .._runtime.edgequant_detect import decode, match
    s_ref, s_q = session(fp32, arena=False), session(int8, level=level, arena=False)
    dtypes = input_dtypes(s_ref)
    n_ref = n_q = matched = images = with_dets = 0
    for batch in batches(samples, batch_size, dtypes):
        (ref,), (q,) = s_ref.run([output], batch), s_q.run([output], batch)
        for r, t in zip(ref, q):
            a = decode(r, conf=conf, iou=IOU_NMS, layout=layout)
            b = decode(t, conf=conf, iou=IOU_NMS, layout=layout)
            images += 1
            with_dets += bool(len(a.boxes))
            n_ref, n_q = n_ref + len(a.boxes), n_q + len(b.boxes)
            matched += match(a, b, iou=IOU_MATCH)
    entry = {"output": output, "layout": layout, "images": images, "images_with_fp32_detections": with_dets,
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
