"""Pad convolutions to the channel counts the target's fast int8 kernels need.

ONNX Runtime's CPU provider runs an int8 depthwise convolution with symmetric weights on MLAS's "ConvSym"
depthwise kernels only when the channel (group) count is a multiple of 16 on x86-64 (8 on ARM64,
``MlasConvSymPackWSize``); any other count falls back to a generic kernel that handles one output pixel at a
time. On MobileNetV3-Large (depthwise blocks of 72, 120, 200 and 184 channels) those layers ran 2-3.6× slower
in int8 than in float, and were what kept the whole model near fp32 speed (benchmarks/mobile_speed.py).

This rewrite changes no function. For each depthwise Conv whose channel count C is not a multiple of ``align``,
it follows the C-channel tensors around it: back to the convolutions that produce them, forward to the
convolutions that read them, through per-channel operations in between (activations, squeeze-excitation
pooling and multiply, elementwise ops with scalar constants). If the whole region is closed in that way, the
producers get zero output channels (zero weights and bias), the depthwise Conv zero channels, and the readers
zero input weights for the added channels, up to C' = ceil(C / align) · align. Whatever the added channels
hold in between (0, or HardSigmoid(0) = 0.5) is multiplied by zero weights where the region ends, so the
outputs are the same. A region that reaches anything else — a graph output, a reshape, a concatenation, a
non-scalar constant, a division by an activation — is left as it is.

The same kernels take a dense convolution's input channels only in multiples of 4: a network's first
convolution reads an RGB image (3 channels) through im2col instead, and was slower in int8 than in float on
MobileNetV3-Large. :func:`pad_input_channels` pads such a graph input with zero channels (a float ``Pad``, and a
``Gather`` that spreads the real channels on AVX2-safe targets, in front of the quantize, so the model's inputs
stay as they are) and gives the convolutions reading it zero weights for them: MobileNetV3-Large 0.754× →
0.719× fp32 latency with everything else in place (benchmarks/mobile_speed.py).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.index import consumers, producers

__all__ = ["pad_depthwise_channels", "pad_input_channels"]

log = logging.getLogger(__name__)

_UNARY = {"Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "LeakyRelu", "Identity", "Elu", "Selu",
          "Softplus", "Neg", "Abs"}
_BINARY = {"Add", "Sub", "Mul", "Div"}
_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool"}


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)  # one wrapper per node, so that id() names it (nodes may have no name)
        self.pos = {id(n): k for k, n in enumerate(self.nodes)}
        self.inits = {i.name: i for i in g.initializer}
        self.producer, self.consumers = producers(g), consumers(g)
        self.boundary = {o.name for o in g.output} | {i.name for i in g.input}

    def dims(self, name: str) -> tuple:
        return tuple(self.inits[name].dims)

    def is_scalar(self, name: str) -> bool:
        return name == "" or (name in self.inits and int(np.prod(self.inits[name].dims)) == 1)


def _conv_kind(g: _Graph, node: onnx.NodeProto) -> str | None:
    """'dense' (group 1), 'depthwise' (one input channel per group, one output channel per group), else None;
    only with a constant weight."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in g.inits:
        return None
    dims = g.dims(node.input[1])
    group = _attr(node, "group", 1)
    if group == 1:
        return "dense"
    if len(dims) >= 3 and dims[1] == 1 and dims[0] == group:
        return "depthwise"
    return None


def _region(g: _Graph, dw: onnx.NodeProto) -> dict[int, set[str]] | None:
    """The closed region of C-channel tensors around depthwise Conv ``dw`` → node position → roles ('out': pad its
    output channels, 'in': pad its input channels, 'dw': pad it as depthwise, 'pass': per-channel op), or None
    when the region is not closed."""
    roles: dict[int, set[str]] = defaultdict(set)
    seen: set[str] = set()
    todo = [dw.input[0], dw.output[0]]
    roles[g.pos[id(dw)]].add("dw")
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.boundary or t in g.inits:
            return None
        p = g.producer.get(t)
        if p is None:
            return None
        if not _visit(g, p, t, "produces", roles, todo):
            return None
        for c in g.consumers.get(t, []):
            if not _visit(g, c, t, "reads", roles, todo):
                return None
    return roles


def _visit(g: _Graph, node: onnx.NodeProto, t: str, how: str, roles, todo: list[str]) -> bool:
    """Add ``node`` (which produces or reads C-channel tensor ``t``) to the region; False if it cannot be."""
    k = g.pos[id(node)]
    kind = _conv_kind(g, node)
    if kind == "dense":
        if how == "produces":
            roles[k].add("out")
        elif node.input[0] == t:
            roles[k].add("in")
        else:
            return False
        return True
    if kind == "depthwise":
        if node.input[0] != t and node.output[0] != t:
            return False
        roles[k].add("dw")
        todo.extend([node.input[0], node.output[0]])
        return True
    if node.op_type in _UNARY or node.op_type in _POOLS:
        if node.input[0] != t and node.output[0] != t:
            return False
        if any(not g.is_scalar(i) for i in node.input[1:]) or len(node.output) != 1:
            return False
        roles[k].add("pass")
        todo.extend([node.input[0], node.output[0]])
        return True
    if node.op_type in _BINARY and len(node.output) == 1:
        if node.op_type == "Div" and not g.is_scalar(node.input[1]):
            return False  # padded zeros would divide
        for i in node.input:
            if i in g.inits:
                if not g.is_scalar(i):
                    return False  # a per-channel constant would need padding too
            else:
                todo.append(i)
        todo.append(node.output[0])
        roles[k].add("pass")
        return True
    return False


def pad_depthwise_channels(model: onnx.ModelProto, align: int) -> tuple[onnx.ModelProto, list[dict]]:
    """fp32 model → (a new model computing the same function with every closed depthwise region padded to a
    multiple of ``align`` channels, [{node, channels, padded}] per padded depthwise Conv)."""
    if align <= 1 or not _candidates(model, align):
        return model, []  # nothing to pad: no copy
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    nodes = g.nodes
    done: set[int] = set()
    padded: list[dict] = []
    new_inits: list[onnx.TensorProto] = []
    dropped: set[str] = set()
    for dw in g.nodes:
        if g.pos[id(dw)] in done or _conv_kind(g, dw) != "depthwise":
            continue
        c = g.dims(dw.input[1])[0]
        if c % align == 0:
            continue
        roles = _region(g, dw)
        done |= set(roles or ())
        if roles is None:
            log.info("depthwise %s (%d channels) left unpadded: its channels reach beyond convolutions", dw.name, c)
            continue
        if not all(_fits(g, nodes[n], r, c) for n, r in roles.items()):
            continue
        target = -(-c // align) * align
        for k, r in roles.items():
            node = nodes[k]
            if "dw" in r:
                _pad_weight(g, node, 0, target, new_inits, dropped, bias=True)
                for a in node.attribute:
                    if a.name == "group":
                        a.i = target
            if "out" in r:
                _pad_weight(g, node, 0, target, new_inits, dropped, bias=True)
            if "in" in r:
                _pad_weight(g, node, 1, target, new_inits, dropped, bias=False)
        tensors = {o for n in roles for o in nodes[n].output} | {i for n in roles for i in nodes[n].input}
        keep = [v for v in out.graph.value_info if v.name not in tensors]
        del out.graph.value_info[:]
        out.graph.value_info.extend(keep)
        padded.extend({"node": nodes[n].name, "channels": c, "padded": target} for n, r in roles.items() if "dw" in r)
    if padded:
        _prune(out, new_inits, dropped)
        log.info("padded %d depthwise convolutions to multiples of %d channels", len(padded), align)
    return (out if padded else model), padded


def _candidates(model: onnx.ModelProto, align: int) -> bool:
    """Whether any depthwise Conv with a constant weight has a channel count that is not a multiple of align."""
    g = _Graph(model)
    return any(_conv_kind(g, n) == "depthwise" and g.dims(n.input[1])[0] % align for n in g.nodes)


def _prune(model: onnx.ModelProto, added: list[onnx.TensorProto], replaced: set[str]) -> None:
    """Append the ``added`` initializers; drop those in ``replaced`` that no node reads any more."""
    used = consumers(model.graph)
    keep = [i for i in [*model.graph.initializer, *added] if i.name in used or i.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _fits(g: _Graph, node: onnx.NodeProto, roles: set[str], c: int) -> bool:
    """Each convolution's weight has C where its role pads."""
    if roles == {"pass"}:
        return True
    dims = g.dims(node.input[1])
    if ("dw" in roles or "out" in roles) and dims[0] != c:
        return False
    return not ("in" in roles and dims[1] != c)


def _pad_weight(g: _Graph, node: onnx.NodeProto, axis: int, target: int, new_inits: list, dropped: set,
                bias: bool) -> None:
    """Zero-pad input ``1`` (the weight) of ``node`` along ``axis`` to ``target`` [and its bias], as new
    initializers (the originals may be shared)."""
    slots = [1, 2] if bias and len(node.input) > 2 and node.input[2] else [1]
    for slot in slots:
        name = node.input[slot]
        w = numpy_helper.to_array(g.inits[name]) if name in g.inits else None
        if w is None:
            continue
        axis_here = 0 if slot == 2 else axis
        if w.shape[axis_here] >= target:
            continue
        widths = [(0, 0)] * w.ndim
        widths[axis_here] = (0, target - w.shape[axis_here])
        new_name = f"{name}_pad{target}_{g.pos[id(node)]}"
        new_inits.append(numpy_helper.from_array(np.pad(w, widths), new_name))
        g.inits[new_name] = new_inits[-1]
        dropped.add(name)
        node.input[slot] = new_name


def pad_input_channels(model: onnx.ModelProto, align: int, *, spread: bool = False
                       ) -> tuple[onnx.ModelProto, list[dict]]:
    """fp32 model → (a new model computing the same function in which each 4-D graph input read only by dense
    convolutions, with more than one channel and a channel count that is not a multiple of ``align``, is
    zero-padded to one in front of them, [{input, channels, padded, spread}]).

    ``spread=True`` (targets whose u8·s8 kernels add adjacent products in saturating 16 bits) puts the real
    channels at even positions, [c0, 0, c1, 0, c2, 0, ...] (Pad then Gather), so that no pair of products along
    the kernel's reduction axis holds two real weights: the convolution can keep full 8-bit weights on AVX2.
    Appending the zero channel instead ([c0, c1, c2, 0]) pairs c0 with c1, whose weights in a stem convolution
    often share a sign, and narrowed them (EfficientNet-Lite0: top-1 agreement 84.4% → 78.1%)."""
    if align <= 1:
        return model, []
    g = _Graph(model)
    todo = []
    for x in model.graph.input:
        dims = x.type.tensor_type.shape.dim
        if x.name in g.inits or x.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4:
            continue
        c = dims[1].dim_value
        users = g.consumers.get(x.name, [])
        # one channel (a grey image) gained nothing at batch 1 on the digits example (1.046x vs 1.051x fp32)
        if c <= 1 or c % align == 0 or not users or any(
                _conv_kind(g, u) != "dense" or u.input[0] != x.name or len(g.dims(u.input[1])) != 4
                or g.dims(u.input[1])[1] != c for u in users):
            continue
        todo.append((x.name, c))
    if not todo:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    info, new_inits, front, replaced = [], [], [], set()
    for name, c in todo:
        target = -(-(2 * c if spread else c) // align) * align
        # channel k of the padded input reads channel place[k] of x; c is the zero channel the Pad appends
        place = [c] * target
        for i in range(c):
            place[2 * i if spread else i] = i
        padded_name = f"{name}_pad{target}"
        widths = f"{padded_name}_widths"
        new_inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1 if spread else target - c, 0, 0],
                                                          np.int64), widths))
        pad_out = f"{padded_name}_zero" if spread else padded_name
        front.append(helper.make_node("Pad", [name, widths], [pad_out], name=f"{padded_name}_pad", mode="constant"))
        if spread:
            index = f"{padded_name}_order"
            new_inits.append(numpy_helper.from_array(np.array(place, np.int64), index))
            front.append(helper.make_node("Gather", [pad_out, index], [padded_name], name=f"{padded_name}_spread",
                                          axis=1))
        for u in g.consumers.get(name, []):
            w = numpy_helper.to_array(g.inits[u.input[1]])
            wide = np.zeros((w.shape[0], target, *w.shape[2:]), w.dtype)
            for k, src in enumerate(place):
                if src < c:
                    wide[:, k] = w[:, src]
            new_name = f"{u.input[1]}_pad{target}_{g.pos[id(u)]}"
            new_inits.append(numpy_helper.from_array(wide, new_name))
            replaced.add(u.input[1])
            u.input[1] = new_name
            u.input[0] = padded_name
        info.append({"input": name, "channels": c, "padded": target, "spread": spread})
    nodes = [*front, *out.graph.node]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _prune(out, new_inits, replaced)
    log.info("padded %d graph inputs to %s for the convolutions reading them", len(info),
             ", ".join(f"{i['padded']} channels" for i in info))
    return out, info
