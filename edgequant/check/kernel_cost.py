"""The kernel choices decided by a cost model, where the build machine does not compute the target's kernels (an ARM
target built on x86, a VNNI target built on an AVX2 machine): fp32 graphs with and without each choice → the
choices whose modelled cost is lower.

    cost(graph) = Σ over Conv/Gemm/MatMul nodes  MACs(node) × slowdown(node)

MACs are counted at batch 1 with ONNX shape inference. ``slowdown`` models MLAS's int8 kernels (docs/targets.md):

- a depthwise Conv whose channel count is not a multiple of the kernel family's (16 on x86-64, 8 on ARM64) runs on
  the generic kernel, one output pixel at a time: ``DEPTHWISE_SLOW`` times the fast one (measured 2-3.6× slower
  than float on MobileNetV3-Large, where the fast int8 kernel is about as fast as float);
- a dense Conv whose input channels are not a multiple of 4 goes through im2col and the int8 GEMM instead of the
  symmetric convolution kernel: ``DENSE_SLOW`` times.

Padding adds MACs (the padded channels are computed as zeros, in the depthwise Conv and the convolutions that
produce and read its channels), so a choice is kept only when what it saves in slowdown exceeds what it adds:
RGB spread to 8 channels (2.7× the stem's MACs) does not pay; 3 → 4 channels (1.33×) does. ``int8_hardsigmoid`` adds no
MACs and replaces DQ → HardSigmoid → Q by one QLinearAdd: always kept. ``softmax_inner_axis`` changes no MACs and
replaces ONNX Runtime's element-wise Transpose of an outer axis (inside its Softmax) by the 2-D one: always kept
where it applies (5.8 → 1.2 ms for YOLOv8n's box distribution on x86-64; the Transpose code is the same C++ on ARM).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, shape_inference

from .kernel_choices import PLAIN, Decision, KernelChoices

__all__ = ["DENSE_SLOW", "DEPTHWISE_SLOW", "FAMILY_MULTIPLE", "decide_by_cost", "graph_cost", "static_shapes"]

DEPTHWISE_SLOW = 3.0
DENSE_SLOW = 1.5
# the channel multiple of MLAS's fast symmetric depthwise kernels, per kernel family
FAMILY_MULTIPLE = {"x86_64": 16, "arm64": 8}
_MIN_GAIN = 0.01

log = logging.getLogger(__name__)


def static_shapes(model: onnx.ModelProto, inputs: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """A graph and its input shapes → every tensor's static shape that shape inference finds."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name in inputs:
            dims = inp.type.tensor_type.shape
            del dims.dim[:]
            for d in inputs[inp.name]:
                dims.dim.add().dim_value = int(d)
    m = shape_inference.infer_shapes(m, data_prop=True)
    out = {i.name: tuple(i.dims) for i in m.graph.initializer}
    for vi in (*m.graph.input, *m.graph.value_info, *m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def graph_cost(model: onnx.ModelProto, inputs: Mapping[str, Sequence[int]], multiple: int) -> float:
    """An fp32 graph, its input shapes (batch 1) and the family's depthwise channel multiple → modelled int8 cost
    (MACs × slowdown; see the module docstring)."""
    shapes = static_shapes(model, inputs)
    total = 0.0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.output[0] not in shapes or n.input[1] not in shapes:
            continue
        out, w = shapes[n.output[0]], shapes[n.input[1]]
        if n.op_type == "Conv":
            group = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "group"), 1)
            macs = float(np.prod(out)) * float(np.prod(w[1:]))
            cin = w[1] * group
            if group > 1 and w[1] == 1:
                macs *= DEPTHWISE_SLOW if cin % multiple else 1.0
            elif group == 1 and cin % 4:
                macs *= DENSE_SLOW
        else:
            macs = float(np.prod(out)) * float(w[0] if n.op_type == "Gemm" and not _transposed(n) else w[-2]
                                               if n.op_type == "MatMul" else w[1])
        total += macs
    return total


def _transposed(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def decide_by_cost(fp32: Mapping[str, onnx.ModelProto], inputs: Mapping[str, Sequence[int]], multiple: int, *,
                   explicit: Sequence[str] = (), host_cpu: str = "",
                   not_applicable: Sequence[str] = ()) -> KernelChoices:
    """fp32 graphs — ``"plain"`` and one per choice (plain + that choice) — their input shapes and the family's
    depthwise multiple → the decisions of the cost model (explicit choices kept; the report says what they cost)."""
    base = graph_cost(fp32[PLAIN], inputs, multiple)
    decisions = []
    for key, graph in fp32.items():
        if key == PLAIN:
            continue
        if key == "int8_hardsigmoid":
            decisions.append(Decision(key, True, None, 0.0, "cost model", "no MACs added; one QLinearAdd for "
                                                                          "DQ → HardSigmoid → Q"))
            continue
        if key == "float_where_faster":
            decisions.append(Decision(key, False, None, 0.0, "cost model", "per-node kernel times need the "
                                                                           "target's kernels on this machine"))
            continue
        if key == "softmax_inner_axis":
            decisions.append(Decision(key, True, None, 0.0, "cost model", "no MACs added; the Softmax's own "
                                                                          "Transposes become 2-D ones"))
            continue
        ratio = graph_cost(graph, inputs, multiple) / base
        pays = ratio < 1 - _MIN_GAIN
        how = "cost model" if pays or key not in explicit else "explicit"
        why = f"modelled {ratio:.3f}x the cost without it (depthwise multiple {multiple})"
        if how == "explicit":
            log.warning("%s is kept because the target profile sets it, but on this model the cost model gives it "
                        "%.3fx the cost without it (remove the key from the profile to let the export decide)",
                        key, ratio)
        decisions.append(Decision(key, pays or key in explicit, ratio, 0.0, how, why if pays else f"{why}: does not pay"))
    decisions += [Decision(k, False, None, 0.0, "not applicable", "changes nothing on this model")
                  for k in not_applicable]
    return KernelChoices(tuple(decisions), "cost model", None, None, host_cpu)
