"""Activation smoothing for int8 transformers (SmoothQuant, Xiao et al. 2023): move per-channel activation
outliers into the weights so that one per-tensor activation scale fits every channel.

Transformer activations carry a few channels whose magnitude is 10-100× the rest (LayerNorm outputs, GELU
outputs); a per-tensor 8-bit scale sized for them leaves the other channels a handful of levels. For
y = x·W with x of shape (..., C) and W of shape (C, N), and any s > 0 of length C:

    y = (x · diag(1/s)) · (diag(s) · W),     s_j = max|x_j|^α / max|W_j,:|^(1-α)

so an elementwise ``Mul(x, 1/s)`` in front of the MatMul (cheap next to the MatMul it feeds) and rows of W
scaled by s give the same function with a flat activation. Where x is a LayerNormalization output read only by
such MatMuls, 1/s goes into its scale and bias instead (exact, and no extra node). Channel maxima come from one streaming pass;
since the smoothed tensor is x/s, its per-tensor range (min_j lo_j/s_j, max_j hi_j/s_j) follows from the same
per-channel statistics, so min-max calibration needs no second pass.

One α for the whole model is a compromise: on all-MiniLM-L6-v2 the GELU outputs want 0.9, the attention contexts
0.6-0.65. With ``alpha="auto"`` each group gets the α of a grid (0.5-1.0) whose int8 product — x/s on the
per-tensor u8 scale its range gives, s·W on symmetric per-channel weights of the target's width — is closest to
the float x·W on rows of real activations kept from the same streaming pass (512 rows a tensor at most,
padding excluded): the SmoothQuant paper's per-layer α search, measured on the quantity that matters. MiniLM:
cosine 0.9979 → 0.9983 with every MatMul int8 (benchmarks/minilm.py), about 3 s of search.

ONNX Runtime's quantizer offers SmoothQuant only through Intel Neural Compressor (an extra, heavy dependency
that keeps activations in memory), hence this small rewrite, a def-use edit on onnx_ir. It serves both the
Hugging Face text path (``encoder.py``) and the ``smooth_quant`` option of the generic export
(``algorithms.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from ..graph.tap import tap
from ..errors import CalibrationError

__all__ = ["ALPHA", "ALPHAS", "Smoothed", "channel_ranges", "channel_stats", "smooth", "smooth_graph", "smooth_muls",
           "smoothable"]

log = logging.getLogger(__name__)

ALPHA = 0.8  # migration strength: on all-MiniLM-L6-v2, 0.7-0.9 reach cosine >= 0.997, 0.5-0.6 do not
ALPHAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # the grid alpha="auto" searches per group
MAX_ROWS = 512  # activation rows kept per tensor for the search
_ROW_BYTES = 4 << 20  # and at most this many bytes of them (wide feed-forward tensors keep fewer rows)


class Smoothed(NamedTuple):
    """:func:`smooth_graph`'s result: the smoothed model, per-tensor ranges in it, groups smoothed, α by group."""

    model: onnx.ModelProto
    ranges: dict[str, tuple[float, float]]
    count: int
    alphas: dict[str, float]


def _weight(node: ir.Node) -> np.ndarray | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or not w.is_initializer() or len(w.uses()) != 1:
        return None
    arr = w.const_value.numpy()
    return arr if arr.ndim == 2 and arr.dtype == np.float32 else None


def _groups(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    """Activation name → the MatMuls that read it with a constant 2-D weight of their own."""
    groups: dict[str, list[ir.Node]] = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        if x is None or x.name is None or x.is_initializer() or x.const_value is not None or _weight(node) is None:
            continue
        groups.setdefault(x.name, []).append(node)
    return groups  # other readers of an activation (residual Add, ...) keep reading the unscaled x


def smoothable(model: onnx.ModelProto) -> list[str]:
    """The activations that feed MatMuls with constant weights (the ones :func:`smooth` can flatten)."""
    return list(_groups(ir.serde.deserialize_model(model).graph))


def channel_ranges(model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], tensors: Sequence[str], *,
                   batch_size: int = 16, progress: Callable[[int], None] | None = None,
                   mask_input: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """fp32 model + samples → per-channel (last axis) running (min, max) of each tensor, in one streaming pass
    (memory: one batch of activations plus 2·C floats per tensor).

    With ``mask_input`` (a 0/1 attention mask input, sequence on axis 1), each batch is cut after its longest
    sequence: the positions cut are padding, which attention and pooling ignore, so their activations need no
    range, and short texts calibrate several times faster than at the full padded length."""
    return channel_stats(model, samples, tensors, batch_size=batch_size, progress=progress, mask_input=mask_input,
                         max_rows=0)[0]


def channel_stats(model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], tensors: Sequence[str], *,
                  batch_size: int = 16, progress: Callable[[int], None] | None = None,
                  mask_input: str | None = None, max_rows: int = MAX_ROWS
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """:func:`channel_ranges` + up to ``max_rows`` activation rows per tensor (last axis = channels), drawn
    evenly from every batch (seeded; with ``mask_input``, from real tokens only), for ``alpha="auto"``."""
    names = list(tensors)
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    n_batches = max(1, -(-len(samples) // max(1, batch_size)))
    for batch, values in tap(model, samples, names, batch_size=batch_size, progress=progress, mask_input=mask_input,
                             low_memory=True):
        real = None
        if max_rows and mask_input is not None and mask_input in batch:
            real = np.asarray(batch[mask_input]).reshape(-1).astype(bool)
        for name, value in values.items():
            if value.dtype.kind != "f" or value.size == 0:
                continue
            flat = value.reshape(-1, value.shape[-1]) if value.ndim else value.reshape(1, 1)
            vmin, vmax = flat.min(axis=0), flat.max(axis=0)
            per_name = -(-min(max_rows, _ROW_BYTES // (4 * flat.shape[1])) // n_batches)
            if name in lo and lo[name].shape != vmin.shape:  # last axis varies (a sequence axis): per tensor
                lo[name], hi[name] = lo[name].min(keepdims=True), hi[name].max(keepdims=True)
                vmin, vmax = vmin.min(keepdims=True), vmax.max(keepdims=True)
                rows.pop(name, None)  # and no rows: a group's channels must keep their meaning
                per_name = 0
            lo[name] = vmin if name not in lo else np.minimum(lo[name], vmin)
            hi[name] = vmax if name not in hi else np.maximum(hi[name], vmax)
            pool = flat[real] if real is not None and real.size == flat.shape[0] else flat
            if per_name > 0 and len(pool) and lo[name].shape == vmin.shape:
                pick = np.sort(rng.choice(len(pool), min(len(pool), per_name), replace=False))
                rows.setdefault(name, []).append(np.array(pool[pick], dtype=np.float32))
    return ({n: (lo[n], hi[n]) for n in names if n in lo},
            {n: np.concatenate(r)[:max_rows] for n, r in rows.items() if n in lo and r})


def _scales(lo: np.ndarray, hi: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|x_j|^α / max|W_j,:|^(1-α) over the group's weights; 1 where a channel or its weights are all
    zero (a channel silent on the calibration data keeps its scale, so it cannot blow up later)."""
    x_max = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    s = np.where((x_max > 0) & (w_max > 0),
                 np.maximum(x_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha), 1.0)
    return np.clip(s, 1e-4, 1e4)


def _int8_error(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray,
                levels: int) -> float:
    """Relative squared error of the int8 products of x/s (per-tensor asymmetric u8, the range the smoothed
    tensor gets) and s·W (symmetric per output channel, |q| ≤ levels) against the float x·W."""
    lo_s, hi_s = min(float((lo / s).min()), 0.0), max(float((hi / s).max()), 0.0)
    step = max(hi_s - lo_s, 1e-8) / 255.0
    zp = np.round(-lo_s / step)
    xq = ((np.clip(np.round(x / s / step) + zp, 0, 255) - zp) * step).astype(np.float32)
    err = total = 0.0
    for w in weights:
        ws = w * s[:, None]
        wmax = np.abs(ws).max(axis=0, keepdims=True)
        wstep = np.where(wmax > 0, wmax / levels, 1.0)
        wq = (np.clip(np.round(ws / wstep), -levels, levels) * wstep).astype(np.float32)
        ref = x @ w
        err += float(np.square(xq @ wq - ref).sum())
        total += float(np.square(ref).sum())
    return err / max(total, 1e-30)


def _best_alpha(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, weights: Sequence[np.ndarray], levels: int) -> float:
    """The α of :data:`ALPHAS` whose int8 product is closest to float on the rows ``x`` (ties: the first)."""
    errors = [_int8_error(x, lo, hi, weights, _scales(lo, hi, weights, a), levels) for a in ALPHAS]
    return ALPHAS[int(np.argmin(errors))]


def _foldable(x: ir.Value, nodes: Sequence[ir.Node], size: int) -> ir.Node | None:
    """The LayerNormalization producing ``x`` when x/s can go into its scale and bias exactly: every reader of
    x is smoothed, x is no graph output, and scale/bias are constants of shape [C] of its own."""
    producer = x.producer()
    if producer is None or producer.op_type != "LayerNormalization" or producer.outputs[0] is not x \
            or x.is_graph_output() or {id(u.node) for u in x.uses()} != {id(n) for n in nodes}:
        return None
    params = producer.inputs[1:]
    if not all(v is not None and v.const_value is not None and v.is_initializer() and len(v.uses()) == 1
               and v.const_value.numpy().shape == (size,) for v in params):
        return None
    return producer


def smooth_graph(model: onnx.ModelProto, stats: dict[str, tuple[np.ndarray, np.ndarray]], *,
                 alpha: float | str = ALPHA, rows: Mapping[str, np.ndarray] | None = None,
                 weight_levels: int = 127) -> Smoothed:
    """fp32 model + per-channel stats → (a new model computing the same function with each smoothable MatMul
    group's input divided by s and its weight rows multiplied by s, per-tensor min-max ranges of every tensor in
    ``stats`` and of each smoothed tensor in the new model, the number of groups smoothed).

    x/s is folded into a LayerNormalization's scale and bias where that is exact (:func:`_foldable`), else it
    is a ``Mul(x, 1/s)`` named ``<x>_smooth`` (see :func:`smooth_muls`) with output ``<x>_smoothed``.

    ``alpha="auto"`` picks each group's α from :data:`ALPHAS` on its ``rows`` (:func:`channel_stats`), the int8
    weights modelled with ``|q| ≤ weight_levels`` (127 for 8 bits, 64 where AVX2's pair rule may narrow them); a
    group without rows gets :data:`ALPHA`."""
    if alpha != "auto" and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise CalibrationError(f"smoothing alpha must be within [0, 1] or \"auto\", not {alpha!r}")
    ir_model = ir.serde.deserialize_model(model)
    graph = ir_model.graph
    ranges = {n: (min(float(lo.min()), 0.0), max(float(hi.max()), 0.0)) for n, (lo, hi) in stats.items()}
    count = folded = 0
    alphas: dict[str, float] = {}
    for name, nodes in _groups(graph).items():
        if name not in stats or stats[name][0].shape[0] != _weight(nodes[0]).shape[0]:
            continue
        lo, hi = (s.astype(np.float64) for s in stats[name])
        weights = [_weight(n) for n in nodes]
        a = float(alpha) if alpha != "auto" else ALPHA
        if alpha == "auto" and rows is not None and name in rows and rows[name].shape[-1] == lo.size:
            a = _best_alpha(rows[name], lo, hi, weights, weight_levels)
        alphas[name] = a
        s = _scales(lo, hi, weights, a)
        x = nodes[0].inputs[0]
        norm = _foldable(x, nodes, s.size)
        if norm is not None:  # LayerNorm(x)·γ/s + β/s = LayerNorm(x)·γ + β, then /s
            for v in norm.inputs[1:]:
                v.const_value = ir.tensor((v.const_value.numpy() / s).astype(np.float32), name=v.name)
            out = x
            folded += 1
        else:
            inv = ir.Value(name=f"{name}_smooth_inv", const_value=ir.tensor((1.0 / s).astype(np.float32)),
                           shape=ir.Shape([s.size]), type=ir.TensorType(ir.DataType.FLOAT))
            graph.register_initializer(inv)
            mul = ir.Node("", "Mul", inputs=[x, inv], name=f"{name}_smooth")
            out = mul.outputs[0]
            out.name, out.shape = f"{name}_smoothed", x.shape
            if x.dtype is not None:  # an intermediate without value_info has none; a None dtype won't serialize
                out.dtype = x.dtype
            producer = x.producer()
            if producer is not None:
                graph.insert_after(producer, mul)
            else:
                graph.insert_before(nodes[0], mul)
        for node in nodes:
            w = node.inputs[1]
            scaled = ir.Value(name=f"{w.name}_smoothed", const_value=ir.tensor(
                (_weight(node) * s[:, None]).astype(np.float32)), shape=w.shape, type=w.type)
            graph.register_initializer(scaled)
            node.replace_input_with(0, out)
            node.replace_input_with(1, scaled)
            if not w.uses():
                del graph.initializers[w.name]
        ranges[out.name] = (min(float((lo / s).min()), 0.0), max(float((hi / s).max()), 0.0))
        count += 1
    log.info("smoothed %d MatMul inputs, %d folded into a LayerNormalization (alpha %s)", count, folded,
             alpha if alpha != "auto" else f"auto: {sorted(alphas.values())}")
    return Smoothed(ir.serde.serialize_model(ir_model), ranges, count, alphas)


def smooth(model: onnx.ModelProto, stats: dict[str, tuple[np.ndarray, np.ndarray]], *, alpha: float | str = ALPHA,
           rows: Mapping[str, np.ndarray] | None = None, weight_levels: int = 127
           ) -> tuple[onnx.ModelProto, dict[str, tuple[float, float]]]:
    """fp32 model + per-channel stats → (the smoothed model, per-tensor ranges in it): :func:`smooth_graph`
    without the count and the α chosen."""
    out = smooth_graph(model, stats, alpha=alpha, rows=rows, weight_levels=weight_levels)
    return out.model, out.ranges


def smooth_muls(model: onnx.ModelProto) -> list[str]:
    """Names of the ``Mul(x, 1/s)`` nodes :func:`smooth_graph` inserted (to keep out of int8: a per-channel
    float multiply in front of an int8 MatMul is cheap, quantizing its output would undo the smoothing)."""
    return [n.name for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth")
            and n.output[0] == n.input[0] + "_smoothed"]
