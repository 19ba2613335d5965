"""Small fp32 graph rewrites that let more of the model run in int8, each a def-use edit on onnx_ir.

- ``global_average_pool``: the dynamo exporter writes ``adaptive_avg_pool2d(x, 1)`` as ReduceMean over the
  spatial axes, which ONNX Runtime's CPU provider has no QDQ fusion for (it runs DQ → float ReduceMean → Q).
  GlobalAveragePool computes the same and fuses into QLinearGlobalAveragePool.

The PTQ job runs it as the ``global-average-pool`` pass of :mod:`edgequant.graph.passes` (verified on calibration
samples); :func:`rewrite_for_int8` is the unverified form for graphs without samples at hand.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["drop_unused_initializers", "global_average_pool", "rewrite_for_int8", "spatial_reduce_means"]

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
