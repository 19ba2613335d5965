"""Cross-layer equalization (Nagel et al. 2019): for Conv A → (Relu | Clip(0, m) | nothing) → Conv B, output
channel i of A is divided by s_i and input channel i of B multiplied by s_i, with s_i = sqrt(r1_i / r2_i) (r1, r2:
the channels' weight ranges), so both get the range sqrt(r1_i · r2_i). Relu(x / s) = Relu(x) / s keeps the fp32
graph exact; a Clip(0, m) becomes Relu then Min with the per-channel bound m / s_i (Clip only takes scalars). It
pays where weights are quantized per tensor (depthwise convolutions, whose channels have very different ranges).
A def-use edit on onnx_ir.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["conv_pairs", "equalize_cross_layer"]

log = logging.getLogger(__name__)


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


def conv_pairs(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node | None, ir.Node]]:
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
    pairs = conv_pairs(graph)
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
