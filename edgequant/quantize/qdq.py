"""fp32 ONNX + activation ranges + target → int8 QDQ ONNX.

QDQ placement is delegated to ONNX Runtime's ``QDQQuantizer``: it knows which DQ→op→Q groups ORT's
optimizer fuses into int8 kernels (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...), writes int32 biases
and per-channel weights, and drops activations (Relu/Clip) that the quantized range makes redundant. What it
lacks, and what is done here: ranges come from our streaming observers (``calibrate.py``) instead of its
in-memory calibrators, the settings come from the target profile, the graph is put back in topological
order, and scales are checked, since a tensor such as an additive attention mask (values near the float32
minimum) would otherwise be quantized with a scale of ~1e36 and silently flatten everything after it.

Affine quantization: q = clamp(round(x / scale) + zero_point, qmin, qmax), x ≈ (q - zero_point) · scale.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import QuantizationError
from ..graph.skeleton import weightless_copy
from ..targets import Target
from .saturation import WeightLimits, weight_limits

__all__ = ["MAX_ACTIVATION_SCALE", "quantize", "skip_absurd_ranges"]

log = logging.getLogger(__name__)

# An 8-bit activation whose step is above this spans more than ±1e6: no real activation needs that, and such
# ranges come from sentinel values (masks filled with the float minimum). Such tensors stay in float.
MAX_ACTIVATION_SCALE = 1e4
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops whose weight (input 1) may be per-channel


def skip_absurd_ranges(ranges: Mapping[str, tuple[float, float]]) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Split ranges into usable ones and the names of tensors whose 8-bit step would exceed the limit."""
    keep, absurd = {}, []
    for name, (lo, hi) in ranges.items():
        if not (np.isfinite(lo) and np.isfinite(hi)) or (hi - lo) / 255.0 > MAX_ACTIVATION_SCALE:
            absurd.append(name)
        else:
            keep[name] = (lo, hi)
    return keep, absurd


def quantize(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], target: Target, *,
             exclude_nodes: Sequence[str] = (), overrides: Mapping[str, list[dict]] | None = None,
             float_outputs: Sequence[str] = (), consume: bool = False,
             limits: WeightLimits | None = None) -> onnx.ModelProto:
    """fp32 model + {tensor: (lo, hi)} + target → QDQ model (a new ModelProto; ``model`` is not changed).
    Nodes whose op type is in ``float_outputs`` get quantized inputs but a float output (a MatMul then runs as
    MatMulIntegerToFloat on ONNX Runtime's CPU provider). ``consume=True`` hands ``model`` over: it is
    quantized in place (no copy of its weights) and must not be used afterwards.
    On targets with ``pair_saturation`` each weight channel gets the range in ``limits`` (see
    ``edgequant.quantize.saturation``; computed from the weights alone when not given)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    q = target.quantization
    usable, absurd = skip_absurd_ranges(ranges)
    if absurd:
        log.info("keeping %d tensors in float (ranges beyond any 8-bit scale, e.g. masks): %s",
                 len(absurd), ", ".join(absurd[:5]))
    exclude = set(exclude_nodes) | _consumers_of(model, absurd) | _activations_read_in_subgraphs(model)
    if q.constant_weight_only:
        inits = {i.name for i in model.graph.initializer}
        exclude |= {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name
                    and not any(i in inits for i in n.input[:2])}
    dtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
        for name, (lo, hi) in usable.items()})
    per_channel_axes = {op: 1 for op in q.per_channel_op_types if op == "MatMul"}
    extra = {
        "ActivationSymmetric": q.activation_symmetric,
        "WeightSymmetric": q.weight_symmetric,
        "QDQOpTypePerChannelSupportToAxis": per_channel_axes,
        "MinimumRealRange": 1e-4,
    }
    per_tensor = _per_tensor_weights(model, q) if q.per_channel else {}
    wide = _uint8_weights(model, q)
    pairs = {}
    if q.pair_saturation:
        if limits is None:
            limits = weight_limits(model, usable, None, op_types=q.op_types, exclude=sorted(exclude))
        pairs = limits.overrides(_initializers(model, set(limits.levels) - set(wide)), per_tensor=set(per_tensor))
    if overrides or per_tensor or wide or pairs:
        extra["TensorQuantOverrides"] = {**per_tensor, **pairs, **wide, **dict(overrides or {})}
    excluded_outputs = sorted(set(float_outputs or ()) | set(q.float_output_op_types))
    if excluded_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = excluded_outputs
    if consume:
        work = model
    else:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    _infer_types(work)
    op_types = [op for op in q.op_types if op not in q.float_op_types]
    quantizer = QDQQuantizer(work, q.per_channel, q.reduce_range, dtype[q.weight_dtype], dtype[q.activation_dtype],
                             tensors, [], sorted(exclude), op_types, extra)
    try:
        quantizer.quantize_model()
    except Exception as exc:
        raise QuantizationError(f"ONNX Runtime's quantizer failed: {type(exc).__name__}: {exc}") from exc
    quantizer.model.topological_sort()
    out = quantizer.model.model
    _sort_subgraph_readers(out.graph)
    _drop_metadata(out)
    _check_scales(out)
    return out


def _infer_types(model: onnx.ModelProto) -> None:
    """ONNX shape inference into ``model``'s value_info, run on a copy without the weights' data, and marked
    done for ONNX Runtime's quantizer, which would otherwise deep-copy, save and reload the whole model for it
    (two more copies of every weight at the peak). Only small initializers (shape tensors) keep their data."""
    g = model.graph
    try:
        if any(n.domain == "com.microsoft" for n in g.node):
            # ONNX's own inference stops at ONNX Runtime's contrib ops (fused SkipLayerNormalization, BiasGelu,
            # Attention): its symbolic inference knows them, so every tensor after them gets a type too. It reads
            # the weights' data (a copy of them at the peak), so it runs only on such graphs
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        else:
            inferred = onnx.shape_inference.infer_shapes(weightless_copy(model))
    except Exception as exc:  # onnx raises its own assorted types
        raise QuantizationError(f"ONNX shape inference failed on the model: {type(exc).__name__}: {exc}") from exc
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)
    model.metadata_props.add(key="onnx.infer", value="onnxruntime.quant")


def _per_tensor_weights(model: onnx.ModelProto, q) -> dict[str, list[dict]]:
    """Weights of quantized ops outside ``per_channel_op_types`` → per-tensor overrides (an override without
    an ``axis`` is per-tensor in ONNX Runtime's quantizer), e.g. Gemm on a provider with per-channel Conv only."""
    inits = {i.name for i in model.graph.initializer}
    return {n.input[1]: [{}] for n in model.graph.node
            if n.op_type in _WEIGHTED and n.op_type in q.op_types and n.op_type not in q.per_channel_op_types
            and len(n.input) > 1 and n.input[1] in inits}


def _uint8_weights(model: onnx.ModelProto, q) -> dict[str, list[dict]]:
    """Weights of nodes named by ``uint8_weight_nodes`` → full-range uint8 overrides (zero point 128 when
    symmetric). u8·u8 products run on ONNX Runtime's U8U8 kernels, which never sum in saturating 16 bits."""
    from onnxruntime.quantization import QuantType

    if not q.uint8_weight_nodes:
        return {}
    patterns = [re.compile(p) for p in q.uint8_weight_nodes]
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if (n.op_type == "MatMul" and n.op_type in q.op_types and len(n.input) > 1
                and n.input[1] in inits and any(p.search(n.name) for p in patterns)):
            spec = {"quant_type": QuantType.QUInt8, "reduce_range": False, "symmetric": q.weight_symmetric}
            if q.per_channel and n.op_type in q.per_channel_op_types:
                spec["axis"] = 1
            out[n.input[1]] = [spec]
    return out


def _initializers(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in names}


def _consumers_of(model: onnx.ModelProto, tensors: Sequence[str]) -> set[str]:
    """Nodes that read or write any of ``tensors`` (so that they are left in float)."""
    wanted = set(tensors)
    return {n.name for n in model.graph.node if wanted & (set(n.input) | set(n.output))}


def _read_in_subgraphs(node: onnx.NodeProto) -> set[str]:
    """The names ``node``'s If/Loop/Scan bodies (at any depth) read."""
    read: set[str] = set()
    pending = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    while pending:
        sub = pending.pop()
        for inner in sub.node:
            read.update(inner.input)
            pending += [a.g for a in inner.attribute if a.type == onnx.AttributeProto.GRAPH]
    return read


def _activations_read_in_subgraphs(model: onnx.ModelProto) -> set[str]:
    """Relu/Clip nodes whose output an If/Loop/Scan body reads: ORT's quantizer drops such an activation into
    the quantized range of its main-graph readers, and the subgraph would then read the value before it."""
    read = set().union(*(_read_in_subgraphs(n) for n in model.graph.node))
    return {n.name for n in model.graph.node if n.name and n.op_type in ("Relu", "Clip") and read & set(n.output)}


def _sort_subgraph_readers(graph: onnx.GraphProto) -> None:
    """Put every node after the producers of what it reads, its bodies' outer-scope reads included, in place
    (ORT's topological sort sees only a node's own inputs, and ONNX's checker refuses an If placed before the
    node whose output its branch reads). Graphs without subgraphs are left as they are."""
    reads = [set(n.input) | _read_in_subgraphs(n) for n in graph.node]
    if all(r == set(n.input) for r, n in zip(reads, graph.node)):
        return
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps = [{producer[x] for x in r if x in producer and producer[x] != i} for i, r in enumerate(reads)]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if not w]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:  # Kahn's algorithm, the lowest original position first (a stable order)
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    placed = set(order)
    order += [i for i in range(len(graph.node)) if i not in placed]  # a cycle: left as it was
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_metadata(model: onnx.ModelProto) -> None:
    keep = [p for p in model.metadata_props if not p.key.startswith("onnx.quant")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.producer_name = "edgequant"


def _check_scales(model: onnx.ModelProto) -> None:
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0) or np.any(scale > MAX_ACTIVATION_SCALE):
            raise QuantizationError(
                f"QuantizeLinear {node.name!r} on tensor {node.input[0]!r} has scale {float(np.max(scale)):.3g}: "
                "that tensor holds sentinel or overflowing values; exclude its consumers (exclude_nodes) or fix "
                "the model")
