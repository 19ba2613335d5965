"""Per-channel weight ranges for CPUs whose u8·s8 kernels add pairs of products in saturating 16 bits.

x86 CPUs with AVX2 but without VNNI run ONNX Runtime's U8S8 GEMM and convolution kernels with VPMADDUBSW: it
multiplies u8 activations by s8 weights and adds each adjacent pair of products, along the reduction axis, into
a saturating int16 before widening. ``|q0·a0 + q1·a1|`` exceeds 32767 only when both weights share a sign
(opposite signs give at most 127·255). The blanket cure, ONNX Runtime's ``reduce_range``, makes every weight
7-bit (``|q| ≤ 64``, so a pair sums to at most 128·255 = 32640) and costs most of the accuracy loss on
pretrained mobile networks. Here each output channel of each Conv/Gemm/MatMul gets the widest weight range
``m`` (``|q| ≤ m``, 64 ≤ m ≤ 127) for which its pair sums provably stay within int16:

1. from the weights alone: every same-sign pair has ``|q0| + |q1| ≤ 128`` (activations reach 255);
2. else measured on calibration data: the activations are quantized as the int8 model will quantize them, and
   each reduction position's largest u8 value (its input channel's, or the zero point where padding enters),
   widened by 10%, bounds ``|q0|·a0 + |q1|·a1`` ≤ 32767. Joint extremes seen in calibration (which pair of
   values occurs together) are not trusted: held-out digits broke a rule built on them; per-channel extremes
   with the margin held. One pass over up to 128 calibration samples, memory one batch of activations.

The pair order is ONNX Runtime's: a convolution's reduction axis runs over (kernel row, kernel column, input
channel), a Gemm/MatMul's over its inner dimension. Depthwise convolutions run on MLAS kernels that widen to
16 bits before multiplying and never saturate. Both facts were checked under ``qemu-x86_64-static -cpu
Haswell`` with weights built to saturate (``tests/test_saturation.py`` asserts the pairing rule itself).
ONNX Runtime's quantizer takes no per-channel bit width, so the result is written as per-channel ``rmin/rmax``
overrides: a symmetric channel with ``rmax = absmax·127/m`` gets ``|q| ≤ m``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.index import producers

__all__ = ["INT16_MAX", "WeightLimits", "pair_matrix", "pair_overflows", "safe_levels", "weight_limits"]

log = logging.getLogger(__name__)

INT16_MAX = 32767
_FULL, _SAFE = 127, 64  # 8-bit symmetric |q| limit; 7-bit limit, safe for any activations
_MAX_SAMPLES = 128
_MARGIN = 0.1  # measured activation extremes are widened by 10% before they are trusted


@dataclass(frozen=True)
class WeightLimits:
    """Per weight initializer: the |q| limit of each output channel (127 = full 8 bits) and its channel axis."""

    levels: Mapping[str, np.ndarray]
    axes: Mapping[str, int]

    def overrides(self, weights: Mapping[str, np.ndarray], per_tensor: set[str] = frozenset()) -> dict[str, list[dict]]:
        """{name: weight} → ONNX Runtime TensorQuantOverrides for those weights: symmetric rmin/rmax per channel
        (per tensor for names in ``per_tensor``, at the narrowest channel's limit) that give each its limit."""
        out = {}
        for name, w in weights.items():
            lv, axis = self.levels[name], self.axes[name]
            if name in per_tensor:
                r = float(np.abs(w).max()) * _FULL / int(lv.min())
                out[name] = [{"rmin": -r, "rmax": r, "symmetric": True, "reduce_range": False}]
                continue
            absmax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
            r = absmax.astype(np.float64) * _FULL / lv
            specs = [{"rmin": float(-v), "rmax": float(v)} for v in r]
            specs[0].update(axis=axis, symmetric=True, reduce_range=False)
            out[name] = specs
        return out

    def summary(self) -> dict[str, int]:
        """Counts of channels at full 8 bits, between, and at the 7-bit floor."""
        allv = np.concatenate([v for v in self.levels.values()]) if self.levels else np.zeros(0)
        return {"weights": len(self.levels), "channels": int(allv.size), "full_8bit": int((allv == _FULL).sum()),
                "reduced": int(((allv < _FULL) & (allv > _SAFE)).sum()), "7bit": int((allv <= _SAFE).sum())}


def pair_matrix(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray | None:
    """A weight → (output channels, reduction length) in the order ONNX Runtime's kernels pair products, or
    None for weights that cannot saturate (depthwise) or that are not laid out as a GEMM."""
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if w.ndim < 3 or (w.shape[1] == 1 and group > 1):
            return None  # depthwise: widened before multiplying
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)  # (Cout, kh, kw, Cin/group)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return w if trans_b else w.T
    if node.op_type == "MatMul" and w.ndim == 2:
        return w.T
    return None


def _quantized(wm: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Symmetric per-row quantization with |q| ≤ levels (ONNX Runtime rounds half to even, as numpy does)."""
    absmax = np.abs(wm).max(axis=1, keepdims=True)
    scale = np.where(absmax > 0, absmax / levels[:, None], 1.0)
    return np.clip(np.round(wm / scale), -levels[:, None], levels[:, None])


def _pairs(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, K) → the two members of each adjacent pair, zero-padded to even K, as |values| with a shared sign
    mask folded in (a pair whose signs differ cannot saturate: its magnitudes are reported as 0)."""
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), q.dtype)], axis=1)
    q0, q1 = q[:, 0::2], q[:, 1::2]
    same = (q0 * q1) > 0
    return np.abs(q0) * same, np.abs(q1) * same


def safe_levels(wm: np.ndarray, bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(Cout, K) weights [+ per pair index j, the largest u8 activations (c0[j], c1[j]) its two positions take]
    → per output channel the largest |q| limit in [64, 127] whose same-sign pair sums stay ≤ 32767."""
    levels = np.full(wm.shape[0], _FULL, dtype=np.int64)
    pending = np.ones(wm.shape[0], dtype=bool)
    for m in range(_FULL, _SAFE, -1):
        rows = np.nonzero(pending)[0]
        if not rows.size:
            break
        levels[rows] = m
        a, b = _pairs(_quantized(wm[rows], levels[rows]))
        ok = (a + b).max(axis=1, initial=0) * 255 <= INT16_MAX  # proven for any activations
        if bounds is not None:
            ok |= (a * bounds[0] + b * bounds[1]).max(axis=1, initial=0) <= INT16_MAX
        pending[rows[ok]] = False
    levels[pending] = _SAFE
    return levels


def _measured_ok(a: np.ndarray, b: np.ndarray, hulls: Mapping[int, np.ndarray]) -> np.ndarray:
    """Rows whose every risky pair j keeps max over the (a0, a1) points seen of a·a0 + b·a1 within int16
    (the exact check of :func:`pair_overflows`)."""
    ok = np.ones(a.shape[0], dtype=bool)
    risky = (a + b) * 255 > INT16_MAX
    v = np.arange(256, dtype=np.float64)
    for j in np.nonzero(risky.any(axis=0))[0]:
        h = hulls.get(int(j))
        if h is None:
            return np.zeros(a.shape[0], dtype=bool)
        seen = h >= 0
        rows = np.nonzero(risky[:, j])[0]
        worst = (a[rows, j, None] * v[seen] + b[rows, j, None] * h[seen]).max(axis=1, initial=0)
        ok[rows[worst > INT16_MAX]] = False
    return ok


def weight_limits(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], samples: Sequence | None,
                  *, op_types: Sequence[str], exclude: Sequence[str] = (), symmetric_activations: bool = False,
                  batch_size: int = 4, max_samples: int = _MAX_SAMPLES) -> WeightLimits:
    """fp32 model + activation ranges [+ calibration samples] → per-channel |q| limits of every quantized
    Conv/Gemm/MatMul weight (u8 activations). Without samples only rule 1 (weights alone) applies."""
    inits = {i.name: i for i in model.graph.initializer}
    excluded = set(exclude)
    todo: dict[str, tuple[onnx.NodeProto, np.ndarray, int]] = {}
    for node in model.graph.node:
        if (node.op_type in ("Conv", "Gemm", "MatMul") and node.op_type in op_types and node.name not in excluded
                and len(node.input) > 1 and node.input[1] in inits and node.input[0] in ranges):
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            wm = pair_matrix(node, w)
            if wm is None or node.input[1] in todo:
                continue
            axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)) else 1
            todo[node.input[1]] = (node, wm, axis)
    first = {name: safe_levels(wm) for name, (_, wm, _) in todo.items()}
    needs = {name for name, lv in first.items() if (lv < _FULL).any()}
    bounds = _bounds(model, {n: todo[n][0] for n in needs}, ranges, samples, symmetric_activations, batch_size,
                     max_samples) if needs and samples is not None and len(samples) else {}
    levels = {name: (safe_levels(todo[name][1], bounds[name]) if name in bounds else lv) for name, lv in first.items()}
    out = WeightLimits(levels, {name: todo[name][2] for name in todo})
    log.info("u8·s8 pair limits: %s", out.summary())
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _act_params(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    """The u8 scale and zero point ONNX Runtime's quantizer derives from a range (MinimumRealRange 1e-4)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    zp, scale = compute_scale_zp(np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0)), np.array(0, np.uint8),
                                 np.array(255, np.uint8), symmetric, 1e-4)
    return float(scale), int(zp)


def _bounds(model, nodes: Mapping[str, onnx.NodeProto], ranges, samples, symmetric: bool, batch_size: int,
            max_samples: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each weight's consumer: per pair index j, the largest u8 values its two reduction positions take on
    the samples (an input channel's maximum, or the zero point where padding enters), widened by the margin."""
    import onnxruntime as ort

    from ..calibration.streaming import batches

    inputs = sorted({n.input[0] for n in nodes.values()})
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    have = {o.name for o in aug.graph.output}
    aug.graph.output.extend(onnx.ValueInfoProto(name=t) for t in inputs if t not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del aug
    dtypes = {i.name: np.dtype(np.float32) for i in sess.get_inputs() if i.type == "tensor(float)"}
    params = {t: _act_params(*ranges[t], symmetric) for t in inputs}
    conv_input = {n.input[0] for n in nodes.values() if n.op_type == "Conv"}
    chmax: dict[str, np.ndarray] = {}
    n = min(len(samples), max_samples)
    n = max(n - n % batch_size, min(n, batch_size))  # whole batches (a fixed-batch model takes no other)
    subset = [samples[i] for i in range(n)]
    for batch in batches(subset, batch_size, dtypes):
        for t, x in zip(inputs, sess.run(inputs, batch)):
            scale, zp = params[t]
            axis = 1 if t in conv_input else x.ndim - 1
            top = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).max(axis=1)
            u8 = np.clip(np.round(top / scale) + zp, 0, 255)
            chmax[t] = u8 if t not in chmax else np.maximum(chmax[t], u8)
    out = {}
    for name, node in nodes.items():
        cols = _columns(node, chmax[node.input[0]], params[node.input[0]][1], _kdims(model, node))
        if cols is None:
            continue
        cols = np.minimum(255, np.ceil(cols * (1 + _MARGIN)))
        if cols.size % 2:
            cols = np.append(cols, 0)
        out[name] = (cols[0::2], cols[1::2])
    return out


def _columns(node: onnx.NodeProto, chmax: np.ndarray, zp: int, wdims: tuple[int, ...]) -> np.ndarray | None:
    """Per input channel maxima → the largest u8 value at each position of the reduction axis, in kernel order."""
    if node.op_type != "Conv":
        return chmax
    cout, cg, *kern = wdims
    group = _attr(node, "group", 1)
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or chmax.size != cg * group:
        return None
    if any(_attr(node, "pads", [0])):
        chmax = np.maximum(chmax, zp)  # padding enters as the zero point
    per_ci = chmax.reshape(group, cg).max(axis=0)  # a group's pairs see its own channels; take the worst group
    return np.tile(per_ci, int(np.prod(kern)))  # (kh, kw, ci) order: channels fastest


def _kdims(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[int, ...]:
    w = next(i for i in model.graph.initializer if i.name == node.input[1])
    return tuple(w.dims)


def _pair_columns(node: onnx.NodeProto, u8: np.ndarray, zp: int, wdims: tuple[int, ...]):
    """Yield (j, (a0, a1)): the activations that meet in pair j of the reduction axis, over all output
    positions (Conv: zero-point padding, strides, dilations; groups share pair indices per group)."""
    if node.op_type != "Conv":
        k = u8.shape[-1]
        for j in range((k + 1) // 2):
            a1 = u8[..., 2 * j + 1] if 2 * j + 1 < k else np.zeros_like(u8[..., 0])
            yield j, (u8[..., 2 * j], a1)
        return
    cout, cg, *kern = wdims
    group = _attr(node, "group", 1)
    if len(kern) != 2 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return  # no data: such a node keeps the limits its weights alone prove
    kh, kw = kern
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    x = np.pad(u8, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=zp)
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    ktot = kh * kw * cg

    def column(g: int, k: int) -> np.ndarray:
        if k >= ktot:
            return np.zeros((x.shape[0], oh, ow), dtype=x.dtype)
        i, jj, ci = k // (kw * cg), (k // cg) % kw, k % cg
        return x[:, g * cg + ci, i * dh: i * dh + (oh - 1) * sh + 1: sh, jj * dw: jj * dw + (ow - 1) * sw + 1: sw]

    for j in range((ktot + 1) // 2):
        a0 = np.concatenate([column(g, 2 * j) for g in range(group)])
        a1 = np.concatenate([column(g, 2 * j + 1) for g in range(group)])
        yield j, (a0, a1)


def pair_overflows(qdq: onnx.ModelProto, samples: Sequence, *, batch_size: int = 16) -> dict[str, int]:
    """QDQ model + samples → {node: output channels whose u8·s8 pair sums leave int16 on those samples}, for
    every Conv/Gemm/MatMul fed by a uint8 activation and a constant int8 weight: what an AVX2 CPU would get
    wrong. Runs the model in exact arithmetic and reads the 8-bit activations at the Q→DQ edges."""
    inits = {i.name: i for i in qdq.graph.initializer}
    producer = producers(qdq.graph)
    nodes: dict[str, tuple[onnx.NodeProto, np.ndarray, str, int]] = {}
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq_a, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_a and dq_w and dq_a.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if dq_w.input[0] not in inits or inits[dq_w.input[0]].data_type != onnx.TensorProto.INT8:
            continue
        if len(dq_a.input) < 3 or dq_a.input[2] not in inits or inits[dq_a.input[2]].data_type != onnx.TensorProto.UINT8:
            continue
        wm = pair_matrix(node, numpy_helper.to_array(inits[dq_w.input[0]]).astype(np.int64))
        if wm is not None:
            nodes[node.name] = (node, wm, dq_a.input[0], int(numpy_helper.to_array(inits[dq_a.input[2]])))
    if not nodes:
        return {}
    hulls = _u8_hulls(qdq, nodes, samples, batch_size)
    out = {}
    for name, (_, wm, _, _) in nodes.items():
        a, b = _pairs(wm)
        bad = int((~_measured_ok(a.astype(np.float64), b.astype(np.float64), hulls[name])).sum())
        if bad:
            out[name] = bad
    return out


def _u8_hulls(qdq, nodes, samples, batch_size):
    import onnxruntime as ort

    from ..calibration.streaming import batches

    taps = sorted({t for _, _, t, _ in nodes.values()})
    aug = onnx.ModelProto()
    aug.CopyFrom(qdq)
    aug.graph.output.extend(onnx.ValueInfoProto(name=t) for t in taps)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    dtypes = {i.name: np.dtype(np.float32) for i in sess.get_inputs() if i.type == "tensor(float)"}
    hulls: dict[str, dict[int, np.ndarray]] = {name: {} for name in nodes}
    for batch in batches(samples, batch_size, dtypes):
        acts = dict(zip(taps, sess.run(taps, batch)))
        for name, (node, wm, tap, zp) in nodes.items():
            dims = (wm.shape[0], -1) if node.op_type != "Conv" else _conv_dims(qdq, node, wm)
            _fold(hulls[name], _pair_columns(node, acts[tap].astype(np.int64), zp, dims))
    return hulls


def _conv_dims(model, node, wm):
    producer = producers(model.graph)
    w = next(i for i in model.graph.initializer if i.name == producer[node.input[1]].input[0])
    return tuple(w.dims)


def _fold(hull: dict[int, np.ndarray], columns) -> None:
    """Fold (j, (a0, a1)) columns into per-pair 'largest a1 seen for each a0' tables (-1: a0 never seen)."""
    for j, (a0, a1) in columns:
        code = np.bincount((a0 * 256 + a1).ravel(), minlength=65536).reshape(256, 256) > 0
        last = np.where(code.any(axis=1), 255 - np.argmax(code[:, ::-1], axis=1), -1)
        prev = hull.get(j)
        hull[j] = last if prev is None else np.maximum(prev, last)
