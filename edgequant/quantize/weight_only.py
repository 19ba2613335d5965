"""Weight-only quantization: fp32 ONNX → the same graph with each MatMul/Gemm whose weight is a constant
replaced by ONNX Runtime's ``MatMulNBits`` (com.microsoft): block-quantized 8- or 4-bit weights, float
activations. The presets, in the spirit of GGUF's Q8/Q4:

=========  ====  ==================================================================================
preset     bits  what is stored per block of ``block_size`` weights along K (the input axis)
=========  ====  ==================================================================================
q8         8     uint8 weights, one float32 scale and one uint8 zero point (asymmetric), round-to-nearest
q4         4     uint4 weights (two a byte), float32 scale, 4-bit zero point (asymmetric), round-to-nearest
q4-gptq    4     as q4, the integers chosen by GPTQ from the calibration data (see ``edgequant.quantize.gptq``)
=========  ====  ==================================================================================

``MatMulNBits`` runs on ONNX Runtime's CPU provider (2, 4 and 8 bits in 1.32) and on CUDA; elsewhere ORT
places it on the CPU. Round-to-nearest goes through ORT's own ``MatMulNBitsQuantizer``; GPTQ is ours because
ORT's GPTQ needs Intel Neural Compressor and keeps all activations in memory. Gemm nodes with a constant
weight are first rewritten to MatMul + Add (an onnx_ir def-use edit), since ORT's quantizer takes MatMul only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import QuantizationError, option
from ..quiet import quiet

__all__ = ["BLOCK_SIZES", "PRESETS", "WeightOnly", "gemm_to_matmul", "quantize_weights", "weight_bytes",
           "weight_matmuls"]

log = logging.getLogger(__name__)

PRESETS = {"q8": (8, "rtn"), "q4": (4, "rtn"), "q4-gptq": (4, "gptq")}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits needs a power of two ≥ 16
DEFAULT_BLOCK_SIZE = 32


@dataclass(frozen=True)
class WeightOnly:
    """A weight-only preset (``q8``, ``q4``, ``q4-gptq``) and its block size along the weight's input axis."""

    preset: str
    block_size: int = DEFAULT_BLOCK_SIZE
    damp: float = 0.01
    # MatMulNBits' accuracy_level: 0 multiplies in float (the weights dequantized); 4 quantizes each activation
    # block to int8 and multiplies in integers, the fast kernels on x86 and ARM (8-bit weights have no other
    # fast path in ONNX Runtime 1.32: one 768×8192 product, 1 thread, VNNI host: q8 31.6 ms at 0, 0.30 ms at 4,
    # fp32 2.2 ms). Decoders use 4 (see jobs/decoder.py).
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise QuantizationError(f"unknown weight preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.block_size not in BLOCK_SIZES:
            raise QuantizationError(f"block size {self.block_size} is not one MatMulNBits takes: use one of "
                                    f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizationError(f"accuracy level must be 0 to 4 (MatMulNBits), not {self.accuracy_level}")
        if not 0 < self.damp < 1:
            raise QuantizationError(f"GPTQ damping must be between 0 and 1, not {self.damp}")

    @property
    def bits(self) -> int:
        return PRESETS[self.preset][0]

    @property
    def method(self) -> str:
        return PRESETS[self.preset][1]

    def to_dict(self) -> dict:
        return {"weights": self.preset, "bits": self.bits, "block_size": self.block_size, "method": self.method,
                "symmetric": False, "scale_dtype": "float32", "op": "com.microsoft.MatMulNBits",
                "activations": "int8 per block" if self.accuracy_level == 4 else "float",
                "accuracy_level": self.accuracy_level,
                "precision": f"{self.bits}-bit weights, "
                             f"{'int8' if self.accuracy_level == 4 else 'float'} activations"}


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(A, B, C) with a constant 2-D B, alpha = beta = 1 and no transA → MatMul(A, B') (+ Add C), where B'
    is B (or Bᵀ for transB). A new model; ``model`` is not changed."""
    m = ir.serde.deserialize_model(model)
    graph = m.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        b = node.inputs[1]
        weight = ir.convenience.get_const_tensor(b) if b is not None else None
        if (weight is None or len(weight.shape) != 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0):
            continue
        w = weight.numpy()
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        w_val = ir.Value(name=f"{b.name}_kn", const_value=ir.tensor(w, name=f"{b.name}_kn"))
        graph.register_initializer(w_val)
        matmul = ir.Node("", "MatMul", [node.inputs[0], w_val], name=node.name)  # --exclude still finds it
        new_nodes = [matmul]
        result = matmul.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.Node("", "Add", [result, node.inputs[2]], name=f"{node.name}_bias")
            new_nodes.append(add)
            result = add.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [result])
        if not b.uses() and b.is_initializer() and not b.is_graph_input():
            graph.initializers.pop(b.name)
        count += 1
    if count:
        log.info("rewrote %d Gemm nodes with constant weights to MatMul", count)
    return ir.serde.serialize_model(m)


def weight_matmuls(model: onnx.ModelProto, exclude_nodes: Sequence[str] = ()) -> list[tuple[str, str, str, tuple]]:
    """MatMul nodes whose second input is a constant 2-D initializer → [(node, input tensor, weight, (K, N))]."""
    inits = {i.name: i for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    skip = set(exclude_nodes)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.name in skip:
            continue
        w = inits.get(node.input[1])
        if w is None or node.input[1] in graph_inputs or len(w.dims) != 2:
            continue
        found.append((node.name, node.input[0], node.input[1], tuple(int(d) for d in w.dims)))
    return found


def quantize_weights(model: onnx.ModelProto, config: WeightOnly,
                     samples: Sequence[dict[str, np.ndarray]] | None = None, *, exclude_nodes: Sequence[str] = (),
                     batch_size: int = 16, progress: bool = True) -> onnx.ModelProto:
    """fp32 model (+ calibration samples for GPTQ) → a new model with MatMulNBits in place of every MatMul/Gemm
    that has a constant weight; ``model`` is not changed."""
    work = gemm_to_matmul(model)
    for name in exclude_nodes:
        if not any(n.name == name for n in work.graph.node):
            raise QuantizationError(f"{option('exclude_nodes', [name])}: the model has no node of that name; the "
                                    "bundle's "
                                    "model.fp32.onnx lists the node names (open it in Netron)")
    layers = weight_matmuls(work, exclude_nodes)
    if not layers:
        raise QuantizationError("the model has no MatMul or Gemm with a constant weight: weight-only quantization "
                                f"({option('weights')}) has nothing to quantize; drop {option('weights')} for int8 "
                                "activations instead")
    for node, _, weight, (k, _n) in layers:
        if k % config.block_size:
            fits = [b for b in BLOCK_SIZES if k % b == 0]
            hint = (f"use {option('block_size', fits[-1])}" if fits
                    else f"exclude it with {option('exclude_nodes', [node])}")
            raise QuantizationError(f"block size {config.block_size} does not divide the input size K={k} of "
                                    f"{node!r} (weight {weight!r}): {hint}")
    if config.method == "rtn":
        out = _rtn(work, config, {n for n, *_ in layers})
    else:
        if samples is None or not len(samples):
            raise QuantizationError(f"{config.preset} needs calibration samples to run GPTQ")
        out = _gptq(work, config, layers, samples, batch_size, progress)
    if config.accuracy_level:
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
                keep = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*keep, onnx.helper.make_attribute("accuracy_level", config.accuracy_level)])
    out.producer_name = "edgequant"
    return out


@contextlib.contextmanager
def _quiet_ort_quantizer():
    """ORT's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) on import and logs each node at INFO:
    keep the caller's logging as it was."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard:
        root.addHandler(guard)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        if guard:
            root.removeHandler(guard)
    with quiet(matmul_nbits_quantizer.__name__, level=logging.WARNING, streams=False):
        yield matmul_nbits_quantizer


def _rtn(model: onnx.ModelProto, config: WeightOnly, include: set[str]) -> onnx.ModelProto:
    import onnxruntime as ort

    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if config.bits == 8 and version < (1, 22):
        raise QuantizationError(f"{option('weights', 'q8')} needs onnxruntime 1.22 or newer (8-bit MatMulNBits), "
                                f"this is {ort.__version__}: upgrade onnxruntime or use {option('weights', 'q4')}")
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    with _quiet_ort_quantizer() as mnq:
        quantizer = mnq.MatMulNBitsQuantizer(model, bits=config.bits, block_size=config.block_size,
                                             is_symmetric=False, nodes_to_exclude=exclude,
                                             op_types_to_quantize=("MatMul",))
        try:
            quantizer.process()
        except Exception as exc:
            raise QuantizationError(f"ONNX Runtime's weight quantizer failed: {type(exc).__name__}: {exc}") from exc
    return quantizer.model.model


def _gptq(model: onnx.ModelProto, config: WeightOnly, layers: list, samples, batch_size: int,
          progress: bool) -> onnx.ModelProto:
    from ..progress import progress_bar

    from .gptq import gptq, hessians, pack_nbits

    inputs = {inp: k for _, inp, _, (k, _n) in layers}
    with progress_bar(total=len(samples), desc="GPTQ activations", unit="sample", disable=not progress,
                      leave=False) as bar:
        h = hessians(model, samples, inputs, batch_size=batch_size, progress=bar.update)
    m = ir.serde.deserialize_model(model)
    graph = m.graph
    nodes = {n.name: n for n in graph}
    for name, inp, _weight, (k, n) in progress_bar(layers, desc="GPTQ layers", unit="layer", disable=not progress,
                                          leave=False):
        node = nodes[name]
        w = node.inputs[1].const_value.numpy()
        q, scales, zeros = gptq(w, h[inp], bits=config.bits, block_size=config.block_size, damp=config.damp)
        packed, zp = pack_nbits(q, zeros, bits=config.bits, block_size=config.block_size)
        scales = scales.astype(w.dtype if w.dtype == np.float16 else np.float32)  # MatMulNBits: scales as A
        consts = []
        for suffix, arr in ((f"_Q{config.bits}", packed), ("_scales", scales), ("_zero_points", zp)):
            v = ir.Value(name=f"{name}{suffix}", const_value=ir.tensor(arr, name=f"{name}{suffix}"))
            graph.register_initializer(v)  # named after the node: a weight shared by two MatMuls stays unique
            consts.append(v)
        attrs = [ir.AttrInt64(a, v) for a, v in (("K", k), ("N", n), ("bits", config.bits),
                                                  ("block_size", config.block_size))]
        new = ir.Node("com.microsoft", "MatMulNBits", [node.inputs[0], *consts], attributes=attrs,
                      name=f"{name}_Q{config.bits}")
        old_w = node.inputs[1]
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        if not old_w.uses() and not old_w.is_graph_input():
            graph.initializers.pop(old_w.name)
    m.opset_imports["com.microsoft"] = 1
    return ir.serde.serialize_model(m)


def weight_bytes(quantized: onnx.ModelProto) -> dict:
    """Bytes of the MatMul weights before (float32 K×N) and after (MatMulNBits B + scales + zero points)."""
    inits = {i.name: i for i in quantized.graph.initializer}
    q_bytes, fp_bytes, layers = 0, 0, 0
    for node in quantized.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        fp_bytes += 4 * attrs["K"] * attrs["N"]
        q_bytes += sum(onnx.numpy_helper.to_array(inits[t]).nbytes for t in node.input[1:4] if t in inits)
        layers += 1
    return {"layers": layers, "fp32_bytes": fp_bytes, "quantized_bytes": q_bytes,
            "ratio": round(q_bytes / fp_bytes, 4) if fp_bytes else None}
