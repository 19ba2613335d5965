"""Quantization algorithms beyond min/max, each an option of :class:`Algorithms`.

- ``equalize`` (cross-layer equalization, Nagel et al. 2019): for Conv A → (Relu | Clip(0, m) | nothing) →
  Conv B, output channel i of A is divided by s_i and input channel i of B multiplied by s_i, with
  s_i = sqrt(r1_i / r2_i) (r1, r2: the channels' weight ranges), so both get the range sqrt(r1_i · r2_i).
  Relu(x / s) = Relu(x) / s keeps the fp32 graph exact; a Clip(0, m) becomes Relu then Min with the
  per-channel bound m / s_i (Clip only takes scalars). It pays where weights are quantized per tensor
  (depthwise convolutions, whose channels have very different ranges).
- ``smooth_quant`` (Xiao et al. 2023): activation outliers of MatMuls with constant weights move into the
  weights; the statistics pass and the rewrite are :mod:`edgequant.transforms.smooth`'s (shared with the Hugging Face
  text path), the inserted float Muls stay out of int8.
- ``bias_correction`` (empirical): after quantization, each Conv/Gemm bias (int32) is corrected, in graph
  order, by the per-channel mean output shift E[y_int8] − E[y_fp32] on calibration samples.
- ``method="auto"``: per tensor, the range among minmax/percentile/entropy/mse that gives the least model
  output error on calibration samples (greedy, one sweep in graph order).

The measurements for bias correction and ``auto`` run the QDQ graph with its activation scales/zero points or
biases turned into graph inputs, so one ONNX Runtime session serves every trial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from ..calibration.streaming import METHODS, HistogramObserver, batches
from ..errors import CalibrationError
from .smooth import ALPHA, channel_ranges, smooth_graph, smoothable

__all__ = ["Algorithms", "auto_ranges", "correct_bias", "equalize_cross_layer", "smooth_quant"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Algorithms:
    """Which algorithms run on top of the calibration method (all off by default)."""

    equalize: bool = False
    bias_correction: bool = False
    smooth_quant: bool = False
    smooth_quant_alpha: float = ALPHA  # migration strength (see edgequant.smooth)
    max_samples: int = 64  # calibration samples used by bias correction and method="auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.smooth_quant_alpha < 1.0:
            raise CalibrationError(f"smooth_quant_alpha must be between 0 and 1, not {self.smooth_quant_alpha}")
        if self.max_samples < 1:
            raise CalibrationError(f"max_samples must be at least 1, not {self.max_samples}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- equalization
def _weight(node: ir.Node, index: int) -> np.ndarray | None:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    v = node.inputs[index]
    if v.const_value is None or len(v.uses()) != 1 or not v.is_initializer():
        return None
    return v.const_value.numpy()


def _only_user(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node if uses[0].idx == 0 else None


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    vals = []
    for i in (1, 2):
        if len(node.inputs) <= i or node.inputs[i] is None or node.inputs[i].const_value is None:
            return None
        vals.append(float(node.inputs[i].const_value.numpy()))
    return vals[0], vals[1]


def _pairs(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node | None, ir.Node]]:
    """(Conv A, activation or None, Conv B) chains whose intermediate values have no other user."""
    out = []
    for a in graph:
        if a.op_type != "Conv" or a.domain not in ("", "ai.onnx") or _weight(a, 1) is None:
            continue
        nxt = _only_user(a.outputs[0])
        act = None
        if nxt is not None and (nxt.op_type == "Relu" or (nxt.op_type == "Clip" and _clip_bounds(nxt) is not None
                                                           and _clip_bounds(nxt)[0] == 0.0)):
            act, nxt = nxt, _only_user(nxt.outputs[0])
        if nxt is None or nxt.op_type != "Conv" or _weight(nxt, 1) is None:
            continue
        w1, w2 = _weight(a, 1), _weight(nxt, 1)
        groups = nxt.attributes["group"].value if "group" in nxt.attributes else 1
        if w2.shape[1] * groups != w1.shape[0]:
            continue
        out.append((a, act, nxt))
    return out


def _in_channel_view(w2: np.ndarray, groups: int) -> np.ndarray:
    """B's weight [Cout, Cin/g, ...] → [Cin, rest]: row i holds every weight that reads input channel i."""
    cout, cpg = w2.shape[0], w2.shape[1]
    return w2.reshape(groups, cout // groups, cpg, -1).transpose(0, 2, 1, 3).reshape(groups * cpg, -1)


def _scale_in_channels(w2: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    cout, cpg = w2.shape[0], w2.shape[1]
    return (w2.reshape(groups, cout // groups, cpg, -1) * s.reshape(groups, 1, cpg, 1)).reshape(w2.shape)


def equalize_cross_layer(model: onnx.ModelProto, *, sweeps: int = 8) -> tuple[onnx.ModelProto, int]:
    """fp32 ModelProto → (a new, equalized ModelProto computing the same function, number of Conv pairs)."""
    m = ir.serde.deserialize_model(model)
    graph = m.graph
    pairs = _pairs(graph)
    if not pairs:
        return model, 0
    w = {id(n): _weight(n, 1).astype(np.float64) for p in pairs for n in (p[0], p[2])}
    b = {id(a): _weight(a, 2).astype(np.float64) for a, _, _ in pairs if _weight(a, 2) is not None}
    total = {id(a): np.ones(w[id(a)].shape[0]) for a, _, _ in pairs}
    for _ in range(sweeps):
        for a, _, bnode in pairs:
            groups = bnode.attributes["group"].value if "group" in bnode.attributes else 1
            r1 = np.abs(w[id(a)].reshape(w[id(a)].shape[0], -1)).max(axis=1)
            r2 = np.abs(_in_channel_view(w[id(bnode)], groups)).max(axis=1)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
            s = np.clip(s, 1e-4, 1e4)
            w[id(a)] = w[id(a)] / s.reshape(-1, *[1] * (w[id(a)].ndim - 1))
            if id(a) in b:
                b[id(a)] = b[id(a)] / s
            w[id(bnode)] = _scale_in_channels(w[id(bnode)], groups, s)
            total[id(a)] *= s
    for a, act, bnode in pairs:
        for node, arr in ((a, w[id(a)]), (bnode, w[id(bnode)])):
            v = node.inputs[1]
            v.const_value = ir.tensor(arr.astype(np.float32), name=v.name)
        if id(a) in b:
            v = a.inputs[2]
            v.const_value = ir.tensor(b[id(a)].astype(np.float32), name=v.name)
        if act is not None and act.op_type == "Clip":
            _clip_to_relu_min(graph, act, total[id(a)], w[id(a)].ndim)
    log.info("equalized %d Conv pairs", len(pairs))
    return ir.serde.serialize_model(m), len(pairs)


def _clip_to_relu_min(graph: ir.Graph, clip: ir.Node, s: np.ndarray, rank: int) -> None:
    """Clip(x, 0, m) on x / s → Min(Relu(x), m / s) with m / s per channel: equal to Clip(x·s, 0, m) / s."""
    _, hi = _clip_bounds(clip)
    bound = ir.Value(name=f"{clip.name}_bound", const_value=ir.tensor(
        (hi / s).astype(np.float32).reshape(1, -1, *[1] * (rank - 2)), name=f"{clip.name}_bound"))
    graph.register_initializer(bound)
    relu = ir.Node("", "Relu", inputs=[clip.inputs[0]], name=f"{clip.name}_relu")
    mn = ir.Node("", "Min", inputs=[relu.outputs[0], bound], name=f"{clip.name}_min")
    old = clip.outputs[0]
    for v in (relu.outputs[0], mn.outputs[0]):
        v.shape, v.dtype = old.shape, old.dtype
    graph.insert_after(clip, [relu, mn])
    old.replace_all_uses_with(mn.outputs[0])
    graph.remove(clip, safe=True)


# ------------------------------------------------------------------------------------------------ SmoothQuant
def smooth_quant(model: onnx.ModelProto, samples, *, alpha: float = ALPHA, batch_size: int = 16,
                 limit: int = 64, progress: Callable[[int], None] | None = None) -> tuple[onnx.ModelProto, int]:
    """fp32 ModelProto + samples → (a new ModelProto with activation outliers moved into MatMul weights,
    computing the same function, number of smoothed activations): per-channel ranges over at most ``limit``
    samples, then :func:`edgequant.transforms.smooth.smooth_graph`. Padding positions count here (no ``mask_input``): the
    generic check compares every output position, padded ones included."""
    tensors = smoothable(model)
    if not tensors:
        return model, 0
    subset = [samples[i] for i in range(min(limit, len(samples)))]
    stats = channel_ranges(model, subset, tensors, batch_size=batch_size, progress=progress)
    smoothed, _, count = smooth_graph(model, stats, alpha=alpha)
    return smoothed, count


# --------------------------------------------------------------------------- trials on one session (helpers)
def _as_inputs(model: onnx.ModelProto, names: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are graph inputs and with extra graph ``outputs``."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    wanted = set(names)
    keep = [i for i in work.graph.initializer if i.name not in wanted]
    moved = [i for i in work.graph.initializer if i.name in wanted]
    del work.graph.initializer[:]
    work.graph.initializer.extend(keep)
    for t in moved:
        work.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    have = {o.name for o in work.graph.output}
    work.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs if o not in have)
    return work


def _runner(model: onnx.ModelProto, samples, batch_size: int):
    """An emulating session (no QDQ fusion, so scales may be inputs) and the sample batches for it."""
    from ..check.fidelity import _dtype, session

    s = session(model, level="disable")
    data_inputs = {i.name: _dtype(i.type) for i in s.get_inputs()}
    stacked = list(batches(samples, batch_size, data_inputs))
    return s, stacked


def _init_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# ------------------------------------------------------------------------------------------- bias correction
def correct_bias(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples, *, batch_size: int = 16,
                 limit: int = 64) -> tuple[onnx.ModelProto, int]:
    """fp32 + QDQ model + calibration samples → (a new QDQ model whose int32 biases cancel the mean output
    shift of each Conv/Gemm, number of corrected nodes). b' = b − (E[y_int8] − E[y_fp32]) per channel."""
    inits = _init_arrays(int8)
    producers = {o: n for n in int8.graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in int8.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    fp32_values = {o for n in fp32.graph.node for o in n.output}
    todo = []  # (fp32 tensor, its int8 counterpart, int32 bias initializer, bias scale)
    for node in int8.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.output[0] not in fp32_values:
            continue
        dq = producers.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
                or inits[dq.input[0]].dtype != np.int32 or dq.input[1] not in inits:
            continue
        todo.append((node.output[0], _after_qdq(node.output[0], users), dq.input[0],
                     inits[dq.input[1]].astype(np.float64)))
    if not todo:
        return int8, 0
    subset = [samples[i] for i in range(min(limit, len(samples)))]
    outs = [t[0] for t in todo]
    ref_s, ref_batches = _runner(_as_inputs(fp32, [], outs), subset, batch_size)
    ref_mean = _channel_means(ref_s, ref_batches, outs, {})
    work = _as_inputs(int8, [t[2] for t in todo], [t[1] for t in todo])
    s, stacked = _runner(work, subset, batch_size)
    feeds = {t[2]: inits[t[2]].copy() for t in todo}
    for out, qout, bias_name, scale in todo:
        mean_q = _channel_means(s, stacked, [qout], feeds)[qout]
        shift = mean_q - ref_mean[out]
        bias = feeds[bias_name].astype(np.float64) * scale - shift
        feeds[bias_name] = np.clip(np.round(bias / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
    result = onnx.ModelProto()
    result.CopyFrom(int8)
    for init in result.graph.initializer:
        if init.name in feeds:
            init.CopyFrom(numpy_helper.from_array(feeds[init.name], init.name))
    log.info("corrected the biases of %d Conv/Gemm nodes", len(todo))
    return result, len(todo)


def _after_qdq(name: str, users: Mapping[str, list[onnx.NodeProto]]) -> str:
    """The value the int8 graph really passes on for ``name``: the DQ(Q(name)) output where there is one (the
    quantizer may have dropped an activation there, the Q's range clipping in its place)."""
    for q in users.get(name, []):
        if q.op_type == "QuantizeLinear":
            for dq in users.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return dq.output[0]
    return name


def _channel_means(s, stacked, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of ``names`` over all batches."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in stacked:
        for n, v in zip(names, s.run(list(names), {**batch, **feeds})):
            flat = np.moveaxis(v.astype(np.float64), 1, 0).reshape(v.shape[1], -1)
            sums[n] = sums.get(n, 0) + flat.sum(axis=1)
            counts[n] = counts.get(n, 0) + flat.shape[1]
    return {n: v / counts[n] for n, v in sums.items()}


# ---------------------------------------------------------------------------------------------- method auto
def histograms(model: onnx.ModelProto, samples, tensors: Sequence[str], *, batch_size: int = 16,
               progress: Callable[[int], None] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """One streaming pass (one bounded histogram per tensor) → {tensor: {method: (lo, hi)}} for every method."""
    from ..check.fidelity import _dtype, session

    s = session(_as_inputs(model, [], tensors), level="basic")
    dtypes = {i.name: _dtype(i.type) for i in s.get_inputs()}
    observers = {t: HistogramObserver("mse") for t in tensors}
    for batch in batches(samples, batch_size, dtypes):
        for t, v in zip(tensors, s.run(list(tensors), batch)):
            if v.dtype.kind == "f":
                observers[t].update(v)
        if progress:
            progress(len(next(iter(batch.values()))))
    out = {}
    for t, obs in observers.items():
        if np.isfinite(obs.lo):
            out[t] = {}
            for method in METHODS:
                obs.method = method
                out[t][method] = obs.range()
    return out


def auto_ranges(fp32: onnx.ModelProto, samples, tensors: Sequence[str], quantize_fn, *, batch_size: int = 16,
                limit: int = 64, progress: Callable[[int], None] | None = None
                ) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Per tensor, the range (among the calibration methods) with the least output error on calibration
    samples → ({tensor: (lo, hi)}, {tensor: method}). ``quantize_fn(ranges)`` → QDQ ModelProto."""
    from ..check.budget import run_outputs, sqnr_db

    cands = histograms(fp32, samples, tensors, batch_size=batch_size, progress=progress)
    subset = [samples[i] for i in range(min(limit, len(samples)))]
    ref = run_outputs(fp32, subset, batch_size=batch_size)
    # Quantize once per method; each model's activation scale/zero point per tensor are the trial values.
    per_method = {}
    for method in METHODS:
        per_method[method] = _init_arrays(quantize_fn({t: r[method] for t, r in cands.items()}))
    base = quantize_fn({t: r["minmax"] for t, r in cands.items()})
    params = [(t, f"{t}_scale", f"{t}_zero_point") for t in cands
              if all(f"{t}_scale" in per_method[m] and f"{t}_zero_point" in per_method[m] for m in METHODS)]
    names = [p for t, sc, zp in params for p in (sc, zp)]
    outs = [o.name for o in fp32.graph.output]
    s, stacked = _runner(_as_inputs(base, names, []), subset, batch_size)

    def error(feeds) -> float:
        got = {n: np.concatenate([s.run([n], {**b, **feeds})[0] for b in stacked]) for n in outs}
        return -sqnr_db(ref, got)

    def feeds_for(choice):
        f = {}
        for t, sc, zp in params:
            f[sc], f[zp] = per_method[choice[t]][sc], per_method[choice[t]][zp]
        return f

    scores = {m: error(feeds_for({t: m for t, _, _ in params})) for m in METHODS}
    start = min(scores, key=scores.get)
    choice = {t: start for t, _, _ in params}
    best = scores[start]
    for t, sc, zp in params:
        for m in METHODS:
            cur, new = per_method[choice[t]], per_method[m]
            if m == choice[t] or (np.allclose(new[sc], cur[sc], rtol=0.01)
                                  and np.array_equal(new[zp], cur[zp])):
                continue
            trial = dict(choice, **{t: m})
            e = error(feeds_for(trial))
            if e < best - 1e-9:
                best, choice = e, trial
    chosen = {t: cands[t][choice.get(t, start)] for t in cands}
    picked = {t: choice.get(t, start) for t in cands}
    log.info("method auto: start %s (SQNR %.2f dB) → %.2f dB", start, -scores[start], -best)
    return chosen, picked
