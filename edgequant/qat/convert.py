"""A prepared QAT module → the bundle's files, manifest and report (the QDQ graph carries the trained scales).

The module's fake quantizers are exported as QuantizeLinear/DequantizeLinear pairs; two def-use edits on
onnx_ir then write the groups in the form ONNX Runtime's QDQ selectors fuse into int8 kernels (constant int8
weights, an int32 bias or none), the form ``onnxruntime.quantization`` writes for PTQ. Recent CPU builds can
quantize a float bias themselves, but other providers and older runtimes cannot, and writing it here fixes its
rounding to the one the QAT model trained with:

- ``fold_weight_quantization``: QuantizeLinear on a constant weight → the int8 initializer it computes;
- ``int32_bias``: a float bias of a Conv/Gemm whose input and weight come from DequantizeLinear → an int32
  DequantizeLinear with scale s_x · s_w, b_q = round(b / (s_x · s_w)), as ONNX Runtime's quantizer writes it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..check.fidelity import compare_outputs
from ..errors import CalibrationError
from ..graph.rewrite import drop_unused_initializers, rewrite_for_int8
from ..graph.sessions import batches, session

__all__ = ["agreement", "fold_weight_quantization", "int32_bias", "int8_groups", "qdq_graphs", "settings", "strip_qdq"]

log = logging.getLogger(__name__)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _along(array: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A per-channel parameter shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if array.ndim == 0:
        return array
    shape = [1] * rank
    shape[axis % rank] = array.size
    return array.reshape(shape)


def fold_weight_quantization(model: ir.Model) -> int:
    """QuantizeLinear(constant) → its int8/uint8 result as an initializer. Returns how many were folded.
    q = clamp(round(w / s) + z, qmin, qmax) (round half to even, as ONNX)."""
    count = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        w, scale, zp = (_const(v) for v in (list(node.inputs) + [None, None])[:3])
        if w is None or scale is None or zp is None:
            continue
        axis = node.attributes["axis"].value if "axis" in node.attributes else 1
        info = np.iinfo(zp.dtype)
        q = np.round(w.astype(np.float32) / _along(scale, axis, w.ndim)) + _along(zp.astype(np.int64), axis, w.ndim)
        q = np.clip(q, info.min, info.max).astype(zp.dtype)
        name = f"{node.inputs[0].name}_quantized"
        value = _initializer(graph, name, q)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        count += 1
    return count


def _dq_scale(value: ir.Value | None) -> np.ndarray | None:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    return _const(producer.inputs[1])


def int32_bias(model: ir.Model) -> int:
    """Float bias of Conv/Gemm after quantized input and weight → int32 DequantizeLinear. Returns the count."""
    count = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        if node.op_type == "Gemm" and not ("transB" in node.attributes and node.attributes["transB"].value == 1):
            continue
        s_x, s_w, bias = _dq_scale(node.inputs[0]), _dq_scale(node.inputs[1]), _const(node.inputs[2])
        if s_x is None or s_w is None or bias is None or s_x.size != 1 or bias.dtype != np.float32:
            continue
        scale = (s_x.astype(np.float32) * s_w.astype(np.float32)).reshape(-1)
        if scale.size not in (1, bias.size):
            continue
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32).copy()
        info = np.iinfo(np.int32)
        b_q = np.clip(np.round(bias.astype(np.float64) / scale), info.min, info.max).astype(np.int32)
        base = node.inputs[2].name or f"{node.name}_bias"
        dq = ir.Node("", "DequantizeLinear", inputs=[
            _initializer(graph, f"{base}_quantized", b_q), _initializer(graph, f"{base}_scale", scale),
            _initializer(graph, f"{base}_zero_point", np.zeros(bias.shape, np.int32))],
            attributes=[ir.AttrInt64("axis", 0)], name=f"{node.name}_bias_dq")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(bias.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        count += 1
    return count


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported QDQ ModelProto → the float graph it fake-quantizes (every QuantizeLinear → DequantizeLinear
    pair bypassed): the same export, so the fp32 reference and the int8 graph share every float op."""
    ir_model = ir.serde.deserialize_model(model)
    graph = ir_model.graph
    for node in list(graph):
        q = node.inputs[0].producer() if node.op_type == "DequantizeLinear" and node.inputs else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        node.outputs[0].replace_all_uses_with(q.inputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not q.outputs[0].uses():
            graph.remove(q, safe=True)
    drop_unused_initializers(graph)
    return ir.serde.serialize_model(ir_model)


def int8_groups(model: onnx.ModelProto, output_names: list[str]) -> onnx.ModelProto:
    """The exported QDQ ModelProto → a new one with int8 weights, int32 biases and the outputs named as in the
    fp32 graph (the exporter names them after the last quantizer)."""
    ir_model = ir.serde.deserialize_model(model)
    taken = {v.name: v for n in ir_model.graph for v in n.outputs}
    for value, name in zip(ir_model.graph.outputs, output_names):
        if value.name == name:
            continue
        other = taken.get(name)
        if other is not None:
            other.name = f"{name}_before_quantization"
        value.name = name
    folded = fold_weight_quantization(ir_model)
    biases = int32_bias(ir_model)
    drop_unused_initializers(ir_model.graph)
    log.info("QAT export: %d weights stored as integers, %d biases as int32", folded, biases)
    return ir.serde.serialize_model(ir_model)


def _output_steps(model: onnx.ModelProto) -> dict[str, float]:
    """Graph output → the scale of the DequantizeLinear that produces it (one output quantization step)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    inits.update(consts)
    producers = {o: n for n in model.graph.node for o in n.output}
    steps = {}
    for out in model.graph.output:
        node = producers.get(out.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            scale = inits[node.input[1]]
            if scale.size == 1:
                steps[out.name] = float(scale.reshape(()))
    return steps


def agreement(gm: Any, int8: onnx.ModelProto, samples: Any, batch_size: int, progress: bool = False,
              level: str = "all") -> list[dict[str, Any]]:
    """The QAT module in PyTorch vs the int8 graph on ONNX Runtime (CPU, at ``level``: the target's
    arithmetic), per output: argmax agreement and the largest absolute difference, also in output steps."""
    import torch

    threads, training = torch.get_num_threads(), gm.training
    torch.set_num_threads(1)  # small batches: one thread is fastest, and contention-free on busy machines
    try:
        outputs = _run_both(gm, int8, samples, batch_size, progress, level)
    finally:
        torch.set_num_threads(threads)
        gm.train(training)
    steps = _output_steps(int8)
    result = []
    for name, (ref, got) in outputs.items():
        fid = compare_outputs(name, ref, got).to_dict()
        step = steps.get(name)
        fid["output_step"] = step
        fid["max_abs_error_steps"] = round(fid["max_abs_error"] / step, 4) if step else None
        result.append(fid)
    return result


def _run_both(gm: Any, int8: onnx.ModelProto, samples: Any, batch_size: int, progress: bool,
              level: str = "all") -> dict[str, tuple]:
    """Output name → (PyTorch outputs, ONNX Runtime outputs) over all samples."""
    import torch
    from ..progress import progress_bar


    sess = session(int8, level=level)
    names = [o.name for o in sess.get_outputs()]
    ref: dict[str, list] = {n: [] for n in names}
    got: dict[str, list] = {n: [] for n in names}
    gm.eval()
    with torch.no_grad():
        for batch in progress_bar(batches(samples, batch_size, {i.name: np.float32 for i in sess.get_inputs()}),
                          total=-(-len(samples) // batch_size), desc="checking against PyTorch", unit="batch",
                          disable=not progress, leave=False):
            outs = gm(**{k: torch.from_numpy(v) for k, v in batch.items()})
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            for n, t, o in zip(names, outs, sess.run(names, batch)):
                ref[n].append(t.numpy())
                got[n].append(o)
    return {n: (np.concatenate(ref[n]), np.concatenate(got[n])) for n in names}


def qdq_graphs(gm: Any, state: Any, samples: Any) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Prepared module + samples (bound to its inputs) → (fp32 graph, int8 QDQ graph) from one export: the
    fake quantizers become Q/DQ pairs, and the fp32 graph is that export with every pair bypassed."""
    import torch

    from ..frontend.torch_export import (convert_opset, prepare_fp32, prune_opset_imports, strip_debug_metadata,
                                         to_onnx)
    from .modules import ActQuant, fixed_copy, quantize_dequantize_onnx

    tgt = state.target
    for name, m in gm.named_modules():
        if isinstance(m, ActQuant) and not bool(m.initialized):
            raise CalibrationError(f"activation quantizer {name!r} has never seen data: run a training step, or "
                                   "pass calibration= to qat.prepare")
    dynamic = not tgt.runtime.static_shapes
    table = {torch.ops.edgequant.quantize_dequantize.default: quantize_dequantize_onnx}
    with torch.no_grad():
        raw = to_onnx(fixed_copy(gm), samples[0], opset=tgt.opset, dynamic_batch=dynamic,
                      custom_translation_table=table)
    fp32 = convert_opset(rewrite_for_int8(prepare_fp32(strip_qdq(raw))), tgt.opset)
    int8 = rewrite_for_int8(int8_groups(raw, [o.name for o in fp32.graph.output]))
    strip_debug_metadata(int8)
    prune_opset_imports(int8)
    int8.producer_name = "edgequant"
    return fp32, convert_opset(int8, tgt.opset)


def settings(gm: Any, state: Any) -> dict[str, Any]:
    """The QAT settings as the manifest and report record them."""
    from .modules import ActQuant

    n_act = sum(isinstance(m, ActQuant) for m in gm.modules())
    return {**asdict(state.config), "quantized_ops": list(state.quantized_ops), "activation_quantizers": n_act}
