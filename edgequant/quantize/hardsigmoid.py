"""HardSigmoid in int8 on ONNX Runtime's CPU provider, as an Add.

The CPU provider has no int8 HardSigmoid (nor HardSwish): in a QDQ graph ``DQ → HardSigmoid → Q`` runs in
float with a dequantize and a quantize around it. MobileNetV3 has 29 of them (hard-swish x·HardSigmoid(x) and
the squeeze-excitation gates), which cost as much as the int8 convolutions saved (benchmarks/mobile_speed.py).

HardSigmoid(x) = clip(αx + β, 0, 1) = clip(x + β/α, 0, 1/α) · α. So, for α > 0 and β > 0:

    DQ(x) → Add(β/α) → Q(scale (1/α)/255, zero point qmin) → DQ(scale 1/255, same zero point)

The quantize clamps the sum to [0, 1/α] (codes qmin..qmax), and reading the same codes back at 1/(1/α) of
that scale multiplies by α: the value is HardSigmoid(x) on 255 steps of [0, 1], which is also where a
calibrated HardSigmoid output lies. ``DQ → Add → Q`` fuses into QLinearAdd. The consumers' dequantize is
rewritten in place; a HardSigmoid whose input is not dequantized, or whose output is read by anything but one
QuantizeLinear (and that by DequantizeLinears only), is left as it is.
"""

from __future__ import annotations

import logging
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.index import consumers, producers

__all__ = ["count_int8_hardsigmoid", "int8_hardsigmoid"]

log = logging.getLogger(__name__)

_QMIN = {onnx.TensorProto.UINT8: 0, onnx.TensorProto.INT8: -128}
_SUFFIX = "_as_add"  # the name of each Add that stands for a HardSigmoid


def int8_hardsigmoid(model: onnx.ModelProto) -> int:
    """Rewrite every eligible ``DQ → HardSigmoid → Q`` in ``model`` (in place) → how many."""
    g = model.graph
    nodes = list(g.node)
    inits = {i.name: i for i in g.initializer}
    producer, read_by = producers(g), consumers(g)
    outputs = {o.name for o in g.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    added: list[onnx.TensorProto] = []
    detached: set[str] = set()
    for k, h in enumerate(nodes):
        if h.op_type != "HardSigmoid":
            continue
        alpha = next((a.f for a in h.attribute if a.name == "alpha"), 0.2)
        beta = next((a.f for a in h.attribute if a.name == "beta"), 0.5)
        src = producer.get(h.input[0])
        users = read_by.get(h.output[0], [])
        if alpha <= 0 or beta <= 0 or src is None or src.op_type != "DequantizeLinear" or h.output[0] in outputs:
            continue
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or len(users[0].input) < 3:
            continue
        q = users[0]
        readers = read_by.get(q.output[0], [])
        if not readers or q.output[0] in outputs or any(r.op_type != "DequantizeLinear" for r in readers):
            continue
        zp = inits.get(q.input[2])
        if zp is None or zp.data_type not in _QMIN or any(len(r.input) < 3 for r in readers):
            continue
        qmin = _QMIN[zp.data_type]
        dtype = np.uint8 if zp.data_type == onnx.TensorProto.UINT8 else np.int8
        tag = f"{h.output[0]}_int8"
        shift, span = float(beta) / float(alpha), 1.0 / float(alpha)
        added += [numpy_helper.from_array(np.array(qmin + 255, dtype), f"{tag}_shift_q"),
                  numpy_helper.from_array(np.array(shift / 255.0, np.float32), f"{tag}_shift_scale"),
                  numpy_helper.from_array(np.array(qmin, dtype), f"{tag}_zero_point"),
                  numpy_helper.from_array(np.array(span / 255.0, np.float32), f"{tag}_sum_scale"),
                  numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), f"{tag}_scale")]
        const = helper.make_node("DequantizeLinear", [f"{tag}_shift_q", f"{tag}_shift_scale", f"{tag}_zero_point"],
                                 [f"{tag}_shift"], name=f"{tag}_shift_dq")
        add = helper.make_node("Add", [h.input[0], f"{tag}_shift"], [h.output[0]],
                               name=f"{h.name or h.output[0]}{_SUFFIX}")
        detached |= {q.input[1], q.input[2], *(i for r in readers for i in r.input[1:3])}
        q.input[1], q.input[2] = f"{tag}_sum_scale", f"{tag}_zero_point"
        for r in readers:
            r.input[1], r.input[2] = f"{tag}_scale", f"{tag}_zero_point"
        replaced[k] = [const, add]
    if replaced:
        rebuilt = []
        for k, n in enumerate(nodes):
            rebuilt.extend(replaced.get(k, [n]))
        del g.node[:]
        g.node.extend(rebuilt)
        used = consumers(g)
        keep = [i for i in g.initializer if i.name in used or i.name not in detached]
        del g.initializer[:]
        g.initializer.extend(keep + added)
        log.info("%d HardSigmoid run as int8 Add", len(replaced))
    return len(replaced)


def count_int8_hardsigmoid(model: onnx.ModelProto) -> int:
    """How many HardSigmoids of ``model`` run as an int8 Add (for the report)."""
    return sum(n.op_type == "Add" and n.name.endswith(_SUFFIX) for n in model.graph.node)
