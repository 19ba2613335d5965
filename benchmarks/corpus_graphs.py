"""Hand-made ONNX graphs for the conformance corpus: the shapes of graph that trained models bring and the other
sources rarely do: several inputs and outputs, int64/bool/scalar inputs, If/Loop subgraphs, recurrent state,
unknown ranks, a batch axis not at 0, NHWC images, opsets 7 to 23.

Each builder → an ``onnx.ModelProto`` (seeded random weights, checked by ``onnx.checker``); :data:`GRAPHS` maps
a name to ``(builder, opset)``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

IR = {7: 3, 9: 4, 11: 6, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}


def _w(rng, *shape, scale=None) -> np.ndarray:
    scale = scale or 1.0 / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else shape[0])
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int, name: str, check: bool = True) -> onnx.ModelProto:
    if IR[opset] < 4:  # before IR 4 every initializer is also a graph input
        inputs = inputs + [_vi(k, h.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in inits.items()]
    graph = h.make_graph(nodes, name, inputs, outputs, [nh.from_array(v, k) for k, v in inits.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=IR[opset],
                         producer_name="edgequant-corpus")
    if check:  # the checker wants a shape on every graph input and output; unknown ranks are left unchecked
        onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name, elem, dims):
    return h.make_tensor_value_info(name, elem, dims)


def cnn(opset: int) -> onnx.ModelProto:
    """Conv → BatchNorm → Relu → MaxPool → Conv → GlobalAveragePool → Flatten → Gemm at any opset from 7."""
    rng = np.random.default_rng(opset)
    inits = {"w1": _w(rng, 16, 3, 3, 3), "b1": _w(rng, 16), "s": 1 + 0.1 * _w(rng, 16), "bb": _w(rng, 16),
             "m": 0.1 * _w(rng, 16), "v": np.abs(1 + 0.1 * _w(rng, 16)), "w2": _w(rng, 32, 16, 3, 3),
             "b2": _w(rng, 32), "wf": _w(rng, 10, 32), "bf": _w(rng, 10)}
    bn = h.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"], epsilon=1e-5)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), bn,
             h.make_node("Relu", ["n1"], ["r1"]),
             h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             h.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c2"], ["r2"]), h.make_node("GlobalAveragePool", ["r2"], ["g"]),
             h.make_node("Flatten", ["g"], ["f"], axis=1),
             h.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    return _model(nodes, [_vi("x", T.FLOAT, ["N", 3, 32, 32])], [_vi("y", T.FLOAT, ["N", 10])], inits, opset,
                  f"cnn_opset{opset}")


def multi_io() -> onnx.ModelProto:
    """Two float inputs (an image and a feature vector) → two outputs (logits and an embedding)."""
    rng = np.random.default_rng(1)
    inits = {"w": _w(rng, 8, 3, 3, 3), "wv": _w(rng, 12, 16), "wo": _w(rng, 24, 5), "we": _w(rng, 24, 16)}
    nodes = [h.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             h.make_node("Relu", ["c"], ["r"]), h.make_node("GlobalAveragePool", ["r"], ["g"]),
             h.make_node("Flatten", ["g"], ["gf"]), h.make_node("MatMul", ["vec", "wv"], ["v1"]),
             h.make_node("Tanh", ["v1"], ["v2"]), h.make_node("Concat", ["gf", "v2"], ["cat"], axis=1),
             h.make_node("MatMul", ["cat", "wo"], ["logits"]), h.make_node("MatMul", ["cat", "we"], ["embedding"])]
    return _model(nodes, [_vi("img", T.FLOAT, ["N", 3, 24, 24]), _vi("vec", T.FLOAT, ["N", 12])],
                  [_vi("logits", T.FLOAT, ["N", 5]), _vi("embedding", T.FLOAT, ["N", 16])], inits, 17, "multi_io")


def int64_tokens() -> onnx.ModelProto:
    """int64 token ids → Gather from an embedding table → MatMul → mean over the sequence → logits."""
    rng = np.random.default_rng(2)
    inits = {"emb": _w(rng, 100, 32, scale=1.0), "w": _w(rng, 32, 32), "wo": _w(rng, 32, 4),
             "axes": np.array([1], np.int64)}
    nodes = [h.make_node("Gather", ["emb", "ids"], ["e"]), h.make_node("MatMul", ["e", "w"], ["m"]),
             h.make_node("Relu", ["m"], ["r"]), h.make_node("ReduceMean", ["r", "axes"], ["p"], keepdims=0),
             h.make_node("MatMul", ["p", "wo"], ["y"])]
    return _model(nodes, [_vi("ids", T.INT64, ["N", 12])], [_vi("y", T.FLOAT, ["N", 4])], inits, 18, "int64_tokens")


def bool_mask() -> onnx.ModelProto:
    """float sequence + bool mask → Where(mask, x, 0) → MatMul → masked mean → output."""
    rng = np.random.default_rng(3)
    inits = {"w": _w(rng, 16, 16), "zero": np.zeros((), np.float32), "axes": np.array([1], np.int64)}
    nodes = [h.make_node("Unsqueeze", ["mask", "axes_u"], ["m3"]),
             h.make_node("Where", ["m3", "x", "zero"], ["xm"]), h.make_node("MatMul", ["xm", "w"], ["y1"]),
             h.make_node("Relu", ["y1"], ["y2"]), h.make_node("ReduceSum", ["y2", "axes"], ["y"], keepdims=0)]
    inits["axes_u"] = np.array([2], np.int64)
    return _model(nodes, [_vi("x", T.FLOAT, ["N", 10, 16]), _vi("mask", T.BOOL, ["N", 10])],
                  [_vi("y", T.FLOAT, ["N", 16])], inits, 14, "bool_mask")


def if_subgraph() -> onnx.ModelProto:
    """A bool scalar input chooses between two MatMul branches (an If with two subgraphs)."""
    rng = np.random.default_rng(4)
    inits = {"w0": _w(rng, 8, 16), "w1": _w(rng, 16, 6), "w2": _w(rng, 16, 6)}
    branch = {}
    for key, w in (("then", "w1"), ("else", "w2")):
        branch[key] = h.make_graph([h.make_node("MatMul", ["hid", w], [f"{key}_y"])], f"{key}_branch", [],
                                   [_vi(f"{key}_y", T.FLOAT, None)])
    nodes = [h.make_node("MatMul", ["x", "w0"], ["m"]), h.make_node("Relu", ["m"], ["hid"]),
             h.make_node("If", ["flag"], ["y"], then_branch=branch["then"], else_branch=branch["else"])]
    return _model(nodes, [_vi("x", T.FLOAT, ["N", 8]), _vi("flag", T.BOOL, [])], [_vi("y", T.FLOAT, None)], inits,
                  16, "if_subgraph", check=False)


def loop_recurrent() -> onnx.ModelProto:
    """A Loop of ``steps`` (int64 scalar input) iterations of h ← tanh(h·W + x·U), state carried in the loop."""
    rng = np.random.default_rng(5)
    inits = {"W": _w(rng, 16, 16), "U": _w(rng, 16, 16), "Wo": _w(rng, 16, 3)}
    body = h.make_graph(
        [h.make_node("MatMul", ["h_in", "W"], ["hw"]), h.make_node("MatMul", ["x", "U"], ["xu"]),
         h.make_node("Add", ["hw", "xu"], ["s"]), h.make_node("Tanh", ["s"], ["h_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [_vi("i", T.INT64, []), _vi("cond_in", T.BOOL, []), _vi("h_in", T.FLOAT, None)],
        [_vi("cond_out", T.BOOL, []), _vi("h_out", T.FLOAT, None)])
    inits["true"] = np.array(True)
    nodes = [h.make_node("Loop", ["steps", "true", "h0"], ["h"], body=body),
             h.make_node("MatMul", ["h", "Wo"], ["y"])]
    return _model(nodes, [_vi("x", T.FLOAT, ["N", 16]), _vi("h0", T.FLOAT, ["N", 16]), _vi("steps", T.INT64, [])],
                  [_vi("y", T.FLOAT, ["N", 3]), ], inits, 13, "loop_recurrent")


def gru_state() -> onnx.ModelProto:
    """A GRU over x (T, N, 8) — the batch axis at 1 — with its initial state (1, N, 16) an input, the final
    state an output (a streaming recurrent model)."""
    rng = np.random.default_rng(6)
    inits = {"W": _w(rng, 1, 48, 8), "R": _w(rng, 1, 48, 16), "B": _w(rng, 1, 96), "Wo": _w(rng, 16, 2)}
    nodes = [h.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["ys", "hn"], hidden_size=16),
             h.make_node("Squeeze", ["ys", "one"], ["ys3"]), h.make_node("MatMul", ["ys3", "Wo"], ["y"])]
    inits["one"] = np.array([1], np.int64)
    return _model(nodes, [_vi("x", T.FLOAT, [20, "batch", 8]), _vi("h0", T.FLOAT, [1, "batch", 16])],
                  [_vi("y", T.FLOAT, [20, "batch", 2]), _vi("hn", T.FLOAT, [1, "batch", 16])], inits, 14, "gru_state")


def unknown_rank() -> onnx.ModelProto:
    """An input declared without a shape (unknown rank) → Flatten → Gemm → Relu → Gemm."""
    rng = np.random.default_rng(7)
    inits = {"w1": _w(rng, 48, 32), "b1": _w(rng, 32), "w2": _w(rng, 32, 4)}
    nodes = [h.make_node("Flatten", ["x"], ["f"], axis=1), h.make_node("Gemm", ["f", "w1", "b1"], ["g"]),
             h.make_node("Relu", ["g"], ["r"]), h.make_node("MatMul", ["r", "w2"], ["y"])]
    x = onnx.ValueInfoProto(name="x")
    x.type.tensor_type.elem_type = T.FLOAT
    return _model(nodes, [x], [_vi("y", T.FLOAT, None)], inits, 11, "unknown_rank", check=False)


def batch_axis_1() -> onnx.ModelProto:
    """A time-major sequence (T, batch, 32): the batch axis is named at position 1, not 0."""
    rng = np.random.default_rng(8)
    inits = {"w": _w(rng, 32, 32), "wo": _w(rng, 32, 6), "axes": np.array([0], np.int64)}
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Relu", ["m"], ["r"]),
             h.make_node("ReduceMean", ["r", "axes"], ["p"], keepdims=0), h.make_node("MatMul", ["p", "wo"], ["y"])]
    return _model(nodes, [_vi("x", T.FLOAT, [16, "batch", 32])], [_vi("y", T.FLOAT, ["batch", 6])], inits, 18,
                  "batch_axis_1")


def scalar_gain() -> onnx.ModelProto:
    """A float scalar input (a gain) scales an image before its convolution."""
    rng = np.random.default_rng(9)
    inits = {"w": _w(rng, 8, 3, 3, 3), "wo": _w(rng, 8, 3)}
    nodes = [h.make_node("Mul", ["x", "gain"], ["xs"]), h.make_node("Conv", ["xs", "w"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c"], ["r"]), h.make_node("GlobalAveragePool", ["r"], ["g"]),
             h.make_node("Flatten", ["g"], ["f"]), h.make_node("MatMul", ["f", "wo"], ["y"])]
    return _model(nodes, [_vi("x", T.FLOAT, ["N", 3, 16, 16]), _vi("gain", T.FLOAT, [])],
                  [_vi("y", T.FLOAT, ["N", 3])], inits, 15, "scalar_gain")


def nhwc_image() -> onnx.ModelProto:
    """An NHWC image input (N, 32, 32, 3) transposed to NCHW inside the graph, then a small CNN."""
    rng = np.random.default_rng(10)
    inits = {"w": _w(rng, 16, 3, 3, 3), "wo": _w(rng, 16, 5)}
    nodes = [h.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             h.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["g"]), h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("MatMul", ["f", "wo"], ["y"])]
    return _model(nodes, [_vi("x", T.FLOAT, ["N", 32, 32, 3])], [_vi("y", T.FLOAT, ["N", 5])], inits, 13, "nhwc")


def attention() -> onnx.ModelProto:
    """LayerNormalization → single-head self-attention (MatMul, Softmax, MatMul) → residual, at opset 17."""
    rng = np.random.default_rng(11)
    d = 32
    inits = {"g": np.ones(d, np.float32), "b": np.zeros(d, np.float32), "wq": _w(rng, d, d), "wk": _w(rng, d, d),
             "wv": _w(rng, d, d), "wo": _w(rng, d, d), "scale": np.array(1 / np.sqrt(d), np.float32)}
    nodes = [h.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             h.make_node("MatMul", ["n", "wq"], ["q"]), h.make_node("MatMul", ["n", "wk"], ["k"]),
             h.make_node("MatMul", ["n", "wv"], ["v"]), h.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             h.make_node("MatMul", ["q", "kt"], ["s0"]), h.make_node("Mul", ["s0", "scale"], ["s"]),
             h.make_node("Softmax", ["s"], ["a"], axis=-1), h.make_node("MatMul", ["a", "v"], ["o"]),
             h.make_node("MatMul", ["o", "wo"], ["p"]), h.make_node("Add", ["x", "p"], ["y"])]
    return _model(nodes, [_vi("x", T.FLOAT, ["N", 16, d])], [_vi("y", T.FLOAT, ["N", 16, d])], inits, 17,
                  "attention")


GRAPHS = {
    "cnn_opset7": (lambda: cnn(7), 7), "cnn_opset11": (lambda: cnn(11), 11), "cnn_opset23": (lambda: cnn(23), 23),
    "multi_io": (multi_io, 17), "int64_tokens": (int64_tokens, 18), "bool_mask": (bool_mask, 14),
    "if_subgraph": (if_subgraph, 16), "loop_recurrent": (loop_recurrent, 13), "gru_state": (gru_state, 14),
    "unknown_rank": (unknown_rank, 11), "batch_axis_1": (batch_axis_1, 18), "scalar_gain": (scalar_gain, 15),
    "nhwc_image": (nhwc_image, 13), "attention": (attention, 17),
}
