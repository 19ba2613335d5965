"""Detection heads: an output that concatenates values of very different ranges → the nodes to keep float.

A YOLO-style head (ultralytics v5/v8/v11) ends in a Concat of decoded box coordinates (up to the image size)
and class scores (0–1). Quantized as one tensor, one scale of ~2.7 per step rounds every score to the same
value. ONNX Runtime's quantizer has no notion of this; what is done here, from the graph and the calibration
ranges:

- find each graph output with an axis a Concat built (check/layout.py: through shape-only ops, and through a
  Concat of detection levels along another axis, as in YOLOv5) whose pieces' ranges are at least ``RANGE_GAP``
  apart in magnitude;
- keep float that Concat and the *decode tail* behind it: every node between it and the last learned
  layers (Conv/MatMul/Gemm with learned weights), i.e. Sigmoid, the DFL Softmax and its fixed 0..n-1
  Conv ("dfl" pattern), anchor arithmetic, Reshape/Split/Concat. The learned convolutions stay int8, each
  branch's last Conv output on its own scale, and the tail is elementwise work on a few hundred thousand
  values: cheaper in float than the Q/DQ pairs int8 would need around it.
- a tail that reaches further than ``MAX_TAIL`` nodes (no learned layer close to the output) is not a pattern
  known here: only the Concat stays float, and the report names it ``"unrecognised"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..check.layout import concat_pieces, static_dims
from ..graph.index import producers as producer_index

__all__ = ["HeadPlan", "mixed_range_heads"]

log = logging.getLogger(__name__)

RANGE_GAP = 10.0
MAX_TAIL = 96
_LEARNED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class HeadPlan:
    """One mixed-range output and what stays float for it."""

    output: str
    concat: str
    pattern: str  # "decode-tail", "decode-tail+dfl" or "unrecognised"
    input_ranges: dict[str, float]  # tensor concatenated → its calibrated |max|
    float_nodes: list[str] = field(default_factory=list)
    parts: list[tuple[int, int]] = field(default_factory=list)  # index ranges of the pieces along ``axis``
    axis: int = 1  # the output's axis the Concat built
    rank: int = 0  # the output's rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_ranges"] = {k: float(f"{v:.4g}") for k, v in self.input_ranges.items()}
        d["parts"] = [list(p) for p in self.parts]
        return d


def mixed_range_heads(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]]) -> list[HeadPlan]:
    """fp32 model + calibration ranges → a plan per output whose Concat mixes ranges (see the docstring)."""
    g = model.graph
    producers = producer_index(g)
    nodes = {n.name: n for n in g.node}
    inits = {i.name: i for i in g.initializer}
    dims = static_dims(model)
    plans = []
    for out, found in concat_pieces(model, dims).items():
        amax = {t: max(abs(ranges[t][0]), abs(ranges[t][1])) for branch in found.branches for t in branch
                if t in ranges}
        if len(amax) < 2 or min(amax.values()) <= 0 or max(amax.values()) / min(amax.values()) < RANGE_GAP:
            continue
        top = nodes.get(found.concats[0])
        if top is None or not top.name:
            continue  # an unnamed Concat cannot be kept float by name
        tail, dfl = _tail(top, producers, inits)
        plan = HeadPlan(out, top.name, "unrecognised", amax, parts=list(found.pieces), axis=found.axis,
                        rank=len(dims.get(out, ())))
        if tail is None:
            plan.float_nodes = list(found.concats)
            log.warning("output %r mixes ranges %s but no learned layer is near it: only its Concat %r stays "
                        "float", out, _fmt(amax), top.name)
        else:
            plan.pattern = "decode-tail+dfl" if dfl else "decode-tail"
            plan.float_nodes = tail
        log.info("output %r mixes ranges %s: %d nodes kept float (%s)", out, _fmt(amax), len(plan.float_nodes),
                 plan.pattern)
        plans.append(plan)
    return plans


def _fmt(amax: Mapping[str, float]) -> str:
    return ", ".join(f"{k} |max| {v:.3g}" for k, v in amax.items())


def _tail(concat: onnx.NodeProto, producers, inits) -> tuple[list[str] | None, bool]:
    """The nodes upstream of ``concat`` up to (not including) learned layers → (names, DFL found); None when the
    walk passes ``MAX_TAIL`` nodes or reaches a graph input (no learned layer in between)."""
    seen: dict[str, onnx.NodeProto] = {}
    stack = [concat]
    dfl = False
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen[node.name] = node
        if len(seen) > MAX_TAIL:
            return None, False
        for t in node.input:
            if not t or t in inits:
                continue
            p = producers.get(t)
            if p is None:
                return None, False  # a graph input: no learned layer between it and the output
            if p.op_type in _LEARNED:
                if _is_dfl(p, inits):
                    dfl = True
                    stack.append(p)
                continue
            stack.append(p)
    return list(seen), dfl


def _is_dfl(node: onnx.NodeProto, inits) -> bool:
    """A Conv whose fixed weight is 0, 1, ..., n-1 over its input channels: the expectation of a distribution
    (Distribution Focal Loss decoding, YOLOv8/v11)."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    w = numpy_helper.to_array(inits[node.input[1]])
    return w.ndim == 4 and w.shape[0] == 1 and w.shape[1] > 1 and np.array_equal(
        w.reshape(-1), np.arange(w.shape[1], dtype=w.dtype))
