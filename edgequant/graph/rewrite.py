"""Small fp32 graph rewrites that let more of the model run in int8, each a def-use edit on onnx_ir.

- ``global_average_pool``: the dynamo exporter writes ``adaptive_avg_pool2d(x, 1)`` as ReduceMean over the
  spatial axes, which ONNX Runtime's CPU provider has no QDQ fusion for (it runs DQ → float ReduceMean → Q).
  GlobalAveragePool computes the same and fuses into QLinearGlobalAveragePool.
- ``softmax_inner_axis``: Transpose(perm) → Softmax(axis k) computes Softmax over axis perm[k] of the Transpose's
  input, then the Transpose. ONNX Runtime's CPU Softmax over an axis that is not the last swaps that axis with the
  last (a Transpose each way): an outer axis (k < rank − 2) goes through the element-wise Transpose, an axis of
  the two innermost through the fast 2-D one. Where perm[k] is one of the two innermost axes and k is not, the
  Softmax is moved in front of the Transpose: YOLOv8's distribution head (Softmax over axis 1 of (1, 16, 4, 8400)
  from a Transpose of (1, 4, 16, 8400)) runs 5.8 → 1.2 ms on one core. Exact (the same sums in the same order).

The PTQ job runs it as the ``global-average-pool`` pass of :mod:`edgequant.graph.passes` (verified on calibration
samples); :func:`rewrite_for_int8` is the unverified form for graphs without samples at hand.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["drop_unused_initializers", "global_average_pool", "outer_axis_softmaxes", "rewrite_for_int8",
           "softmax_inner_axis", "spatial_reduce_means"]

log = logging.getLogger(__name__)


def _spatial_axes(node: ir.Node, rank: int) -> bool:
    """True if ``node`` (ReduceMean) reduces exactly axes 2..rank-1 of a rank ≥ 3 input."""
    if rank < 3:  # unknown (0) or no spatial axes
        return False
    axes = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        const = ir.convenience.get_const_tensor(node.inputs[1])
        if const is None:
            return False
        axes = const.numpy().tolist()
    elif "axes" in node.attributes:
        axes = list(node.attributes["axes"].value)
    if axes is None:
        return False
    norm = sorted(a % rank for a in np.atleast_1d(axes).tolist())
    return norm == list(range(2, rank))


def spatial_reduce_means(graph: ir.Graph) -> list[ir.Node]:
    """The ReduceMean nodes of ``graph`` that average over all spatial axes (what :func:`global_average_pool`
    rewrites)."""
    found = []
    for node in graph:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        rank = len(x.shape) if x is not None and x.shape is not None else 0
        if not _spatial_axes(node, rank):
            continue
        if "noop_with_empty_axes" in node.attributes and node.attributes["noop_with_empty_axes"].value:
            continue
        found.append(node)
    return found


def global_average_pool(model: ir.Model) -> int:
    """ReduceMean over all spatial axes (keepdims=1) → GlobalAveragePool; keepdims=0 adds a Flatten.
    Returns how many nodes were rewritten."""
    count = 0
    graph = model.graph
    for node in spatial_reduce_means(graph):
        x = node.inputs[0]
        keepdims = node.attributes["keepdims"].value if "keepdims" in node.attributes else 1
        gap = ir.Node("", "GlobalAveragePool", inputs=[x], name=f"{node.name}_gap")
        new_nodes = [gap]
        result = gap.outputs[0]
        result.dtype = x.dtype
        if not keepdims:
            flat = ir.Node("", "Flatten", inputs=[result], attributes=[ir.AttrInt64("axis", 1)],
                           name=f"{node.name}_flatten")
            new_nodes.append(flat)
            result = flat.outputs[0]
        old = node.outputs[0]
        result.shape, result.dtype = old.shape, old.dtype
        graph.insert_after(node, new_nodes)
        was_output = old.is_graph_output()
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if was_output:
            name = old.name
            old.name = None
            result.name = name
        count += 1
    return count


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def outer_axis_softmaxes(model: ir.Model) -> list[tuple[ir.Node, ir.Node, int]]:
    """(Softmax or LogSoftmax, the Transpose feeding it, the axis of the Transpose's input it then reduces) for
    each one :func:`softmax_inner_axis` moves: opset ≥ 13 (one axis, not the flattened tail of opset < 13), a
    Transpose read by nothing else, the Softmax over an outer axis k < rank − 2 that is perm[k] ≥ rank − 2 of the
    Transpose's input."""
    if _opset(model) < 13:
        return []
    found = []
    for node in model.graph:
        if node.op_type not in ("Softmax", "LogSoftmax") or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        t = x.producer() if x is not None else None
        if t is None or t.op_type != "Transpose" or t.domain not in ("", "ai.onnx") or "perm" not in t.attributes:
            continue
        if len(x.uses()) != 1 or x.is_graph_output() or t.graph is not model.graph:
            continue
        perm = list(t.attributes["perm"].value)
        rank = len(perm)
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        if not -rank <= axis < rank:
            continue
        k = axis % rank
        if k < rank - 2 and perm[k] >= rank - 2:
            found.append((node, t, perm[k]))
    return found


def softmax_inner_axis(model: ir.Model) -> int:
    """Transpose → Softmax over an outer axis → Softmax over the matching inner axis → Transpose (see the
    module docstring). Returns how many were moved."""
    graph = model.graph
    found = outer_axis_softmaxes(model)
    for i, (node, t, inner) in enumerate(found):
        src, old = t.inputs[0], node.outputs[0]
        soft = ir.Node(node.domain, node.op_type, inputs=[src], attributes=[ir.AttrInt64("axis", inner)],
                       name=f"{node.name or f'softmax_{i}'}_inner")
        soft.outputs[0].dtype, soft.outputs[0].shape = src.dtype or old.dtype, src.shape
        trans = ir.Node(t.domain, "Transpose", inputs=[soft.outputs[0]], attributes=[t.attributes["perm"]],
                        name=f"{t.name or f'transpose_{i}'}_after")
        trans.outputs[0].dtype, trans.outputs[0].shape = old.dtype, old.shape
        graph.insert_after(node, [soft, trans])
        was_output = old.is_graph_output()
        old.replace_all_uses_with(trans.outputs[0], replace_graph_outputs=True)
        graph.remove([node, t], safe=True)
        if was_output:
            name = old.name
            old.name = None
            trans.outputs[0].name = name
    return len(found)


def drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def rewrite_for_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 ModelProto → a new ModelProto with the int8-friendly rewrites applied."""
    ir_model = ir.serde.deserialize_model(model)
    n = global_average_pool(ir_model)
    if n:
        log.info("rewrote %d spatial ReduceMean into GlobalAveragePool", n)
        drop_unused_initializers(ir_model.graph)
    return ir.serde.serialize_model(ir_model)
