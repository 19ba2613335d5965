"""What an output is, read from the graph: which axis of it a Concat built (and from which pieces), and
whether it is a dense map over the input's pixels.

- **Concat pieces.** From each graph output the producers are walked back through shape-only ops (Reshape,
  Transpose, Squeeze, Unsqueeze, Flatten, Identity, Cast) to a Concat; the Concat's axis is carried forward
  through those ops to the output's own axis, with the index range of each Concat input along it. A Concat
  along *another* axis whose inputs all carry the same pieces (YOLOv5's per-level outputs joined along the
  anchor axis, each a Concat of box and score columns) passes them on. An axis that cannot be followed
  (a Reshape that merges it with others, sizes unknown) gives no pieces: no guessing from value ranges.
  Only these pieces may be scored as separate parts of an output (check/outputs.py), so an output is never
  cut along image rows or columns.
- **Dense maps.** A 4-D output (N, C, H, W) whose H and W are the spatial size of a 4-D input scaled by the
  same power of two (1/32 … 8): segmentation logits, probability (text, mask) maps, depth. Never split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.index import producers
from ..graph.skeleton import weightless_copy

__all__ = ["SHAPE_ONLY", "ConcatPieces", "concat_pieces", "dense_map", "static_dims"]

log = logging.getLogger(__name__)

SHAPE_ONLY = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast")
MAX_DEPTH = 16


@dataclass(frozen=True)
class ConcatPieces:
    """An output axis built by Concat: the index range of each piece along it, the Concat node(s) and the
    tensors concatenated (per piece: the inputs of every Concat that built it)."""

    axis: int
    pieces: tuple[tuple[int, int], ...]
    concats: tuple[str, ...]
    branches: tuple[tuple[str, ...], ...]


def static_dims(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Tensor name → its dims from ONNX shape inference (None where symbolic or unknown); only tensors of known
    rank. Shape inference runs on a copy without the weights' data."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model))
    except Exception as exc:  # onnx raises assorted types; the pieces are then unknown, never guessed
        log.debug("shape inference failed (%s): outputs are not split into parts", exc)
        return {}
    out = {}
    for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return out


def concat_pieces(model: onnx.ModelProto, dims: Mapping[str, tuple] | None = None) -> dict[str, ConcatPieces]:
    """fp32 model → {graph output: the axis a Concat built and its pieces}, for the outputs where the graph
    shows one (see the module docstring)."""
    dims = static_dims(model) if dims is None else dims
    prod = producers(model.graph)
    out = {}
    memo: dict[str, ConcatPieces | None] = {}
    for o in model.graph.output:
        found = _trace(o.name, prod, dims, 0, memo)
        if found is not None and len(found.pieces) > 1:
            out[o.name] = found
    return out


def _trace(tensor: str, prod, dims, depth: int, memo: dict) -> ConcatPieces | None:
    """A tensor → the axis of it a Concat built, with its pieces, or None (memoized per tensor)."""
    if tensor not in memo:
        memo[tensor] = _trace_once(tensor, prod, dims, depth, memo)
    return memo[tensor]


def _trace_once(tensor: str, prod, dims, depth: int, memo: dict) -> ConcatPieces | None:
    node = prod.get(tensor)
    if node is None or depth > MAX_DEPTH:
        return None
    if node.op_type in SHAPE_ONLY:
        inner = _trace(node.input[0], prod, dims, depth + 1, memo)
        if inner is None:
            return None
        axis = _carry(node, inner.axis, dims.get(node.input[0]), dims.get(tensor))
        return None if axis is None else ConcatPieces(axis, inner.pieces, inner.concats, inner.branches)
    if node.op_type != "Concat":
        return None
    rank = len(dims.get(tensor, ()))
    if not rank:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % rank
    inner = [_trace(t, prod, dims, depth + 1, memo) for t in node.input]
    first = inner[0]
    if first is not None and first.axis != axis and all(
            i is not None and (i.axis, i.pieces) == (first.axis, first.pieces) for i in inner):
        # joined along another axis (detection levels): each input carries the same pieces
        branches = tuple(tuple(b for i in inner for b in i.branches[k]) for k in range(len(first.pieces)))
        return ConcatPieces(first.axis, first.pieces, (node.name, *(c for i in inner for c in i.concats)), branches)
    sizes = [dims.get(t, ())[axis] if len(dims.get(t, ())) == rank else None for t in node.input]
    if any(s is None for s in sizes):
        return None
    starts = np.cumsum([0, *sizes]).tolist()
    return ConcatPieces(axis, tuple(zip(starts[:-1], starts[1:])), (node.name,), tuple((t,) for t in node.input))


def _carry(node: onnx.NodeProto, axis: int, src: Sequence | None, dst: Sequence | None) -> int | None:
    """An axis of a shape-only node's input → the same axis of its output, or None where it does not survive
    as one axis of the same length."""
    if node.op_type in ("Identity", "Cast"):
        return axis
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm is None:
            perm = list(range(len(src or ())))[::-1]
        return perm.index(axis) if axis in perm else None
    if src is None or dst is None or axis >= len(src) or src[axis] is None:
        return None
    # Reshape, Flatten, Squeeze, Unsqueeze: the axis survives where the sizes before it (or after it) multiply
    # to the same number on both sides and its own length is kept
    for b in range(len(dst)):
        if dst[b] != src[axis]:
            continue
        before, after = _product(src[:axis]), _product(src[axis + 1:])
        if (before is not None and before == _product(dst[:b])) or (after is not None and after == _product(
                dst[b + 1:])):
            return b
    return None


def _product(dims: Sequence[int | None]) -> int | None:
    return None if any(d is None for d in dims) else math.prod(dims)


def dense_map(shape: Sequence[int], input_shapes: Sequence[Sequence[int]]) -> bool:
    """An output's shape + the inputs' shapes (one batch) → whether it is a dense map: (N, C, H, W) with H and
    W the spatial size of a 4-D input scaled by one power of two between 1/32 and 8."""
    if len(shape) != 4 or min(shape[2:]) < 2:
        return False
    for s in input_shapes:
        if len(s) == 4 and min(s[2:]) >= 2:
            rh, rw = shape[2] / s[2], shape[3] / s[3]
            if math.isclose(rh, rw, rel_tol=0.05) and any(math.isclose(rh, 2.0 ** k, rel_tol=0.05)
                                                          for k in range(-5, 4)):
                return True
    return False
