"""Hand-made ONNX graphs for the bad-input tests: old opsets with initializers listed as graph inputs (IR 3
style), batch axes other than 0, recurrent state, scalar/int64/bool inputs, If subgraphs, unknown ranks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

F = TensorProto.FLOAT
BOOL = TensorProto.BOOL


def _weights(seed: int = 0) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    return [nh.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "conv1_w_0"),
            nh.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "conv1_b_0"),
            nh.from_array(rng.standard_normal((10, 8)).astype(np.float32) * 0.3, "fc_w_0"),
            nh.from_array(rng.standard_normal(10).astype(np.float32) * 0.1, "fc_b_0")]


def old_conv_gemm(opset: int) -> onnx.ModelProto:
    """A small Conv → Relu → ReduceMean (spatial) → Flatten → Gemm classifier at ``opset`` (7-23), written the
    way old exporters did: every initializer also a graph input, IR 3 where the opset allows it."""
    inits = _weights()
    mean = (oh.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=1) if opset >= 18 else
            oh.make_node("ReduceMean", ["r"], ["m"], axes=[2, 3], keepdims=1))
    if opset >= 18:
        inits.append(nh.from_array(np.array([2, 3], np.int64), "axes"))
    nodes = [oh.make_node("Conv", ["data_0", "conv1_w_0", "conv1_b_0"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c"], ["r"]), mean,
             oh.make_node("Flatten", ["m"], ["f"]),
             oh.make_node("Gemm", ["f", "fc_w_0", "fc_b_0"], ["prob_1"], transB=1)]
    inputs = [oh.make_tensor_value_info("data_0", F, [1, 3, 16, 16])]
    inputs += [oh.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    graph = oh.make_graph(nodes, f"old{opset}", inputs, [oh.make_tensor_value_info("prob_1", F, [1, 10])],
                          initializer=inits)
    opsets = [oh.make_opsetid("", opset)]
    ir = 3 if opset <= 9 else oh.find_min_ir_version_for(opsets)  # the model zoo wrote IR 3 up to opset 9
    model = oh.make_model(graph, opset_imports=opsets, ir_version=ir)
    onnx.checker.check_model(model)
    return model


def _model(nodes, inputs, outputs, inits, opset: int = 18) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _w(name: str, *shape: int, seed: int = 0) -> onnx.TensorProto:
    return nh.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.4, name)


def time_major(steps: int | str = "T") -> onnx.ModelProto:
    """x [T, N, 8] (time first, batch N on axis 1) → MatMul → Relu → MatMul → y [T, N, 4]."""
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("MatMul", ["r", "w2"], ["y"])]
    return _model(nodes, [oh.make_tensor_value_info("x", F, [steps, "N", 8])],
                  [oh.make_tensor_value_info("y", F, [steps, "N", 4])], [_w("w1", 8, 16), _w("w2", 16, 4, seed=1)])


def mixed_inputs() -> onnx.ModelProto:
    """Float features x [batch, 16], int64 token ids [batch, 4], a bool flag [batch] and a float scalar gain
    (no batch axis) → y [batch, 4]: an embedding mean added to a MatMul, scaled, ReLU'd where the flag is set."""
    nodes = [oh.make_node("Gather", ["table", "ids"], ["e"]),
             oh.make_node("ReduceMean", ["e", "one"], ["em"], keepdims=0),
             oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Add", ["h", "em"], ["s"]),
             oh.make_node("Mul", ["s", "gain"], ["g"]), oh.make_node("Relu", ["g"], ["gr"]),
             oh.make_node("Unsqueeze", ["flag", "one"], ["f2"]), oh.make_node("Where", ["f2", "gr", "g"], ["w"]),
             oh.make_node("MatMul", ["w", "w2"], ["y"])]
    inputs = [oh.make_tensor_value_info("x", F, ["batch", 16]),
              oh.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
              oh.make_tensor_value_info("flag", TensorProto.BOOL, ["batch"]),
              oh.make_tensor_value_info("gain", F, [])]
    inits = [_w("table", 10, 16, seed=2), nh.from_array(np.array([1], np.int64), "one"), _w("w1", 16, 16),
             _w("w2", 16, 4, seed=1)]
    return _model(nodes, inputs, [oh.make_tensor_value_info("y", F, ["batch", 4])], inits)


def with_if() -> onnx.ModelProto:
    """x [N, 8] and a bool scalar flag (no batch axis) → MatMul → Relu → If (flag: the Relu's output, read from
    the outer scope; else: a MatMul in the subgraph) → MatMul → y [N, 4]."""
    then = oh.make_graph([oh.make_node("Identity", ["r"], ["t"])], "then", [], [oh.make_tensor_value_info("t", F, None)])
    other = oh.make_graph([oh.make_node("MatMul", ["h", "w3"], ["o"])], "else", [],
                          [oh.make_tensor_value_info("o", F, None)])
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("If", ["flag"], ["b"], then_branch=then, else_branch=other),
             oh.make_node("MatMul", ["b", "w2"], ["y"])]
    inits = [_w("w1", 8, 16), _w("w2", 16, 4, seed=1), _w("w3", 16, 16, seed=3)]
    return _model(nodes, [oh.make_tensor_value_info("x", F, ["N", 8]), oh.make_tensor_value_info("flag", BOOL, [])],
                  [oh.make_tensor_value_info("y", F, ["N", 4])], inits)


def _no_shape(name: str) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto(name=name)
    value.type.tensor_type.elem_type = F
    return value


def unknown_rank() -> onnx.ModelProto:
    """An input of unknown rank (no shape: ONNX's checker refuses it, ONNX Runtime runs it) → Conv → Relu → an
    If whose branches give no shape → ReduceMean over axes 2, 3 of that unknown-rank value → Flatten → Gemm."""
    then = oh.make_graph([oh.make_node("Identity", ["r"], ["t"])], "then", [], [_no_shape("t")])
    other = oh.make_graph([oh.make_node("Neg", ["r"], ["o"])], "else", [], [_no_shape("o")])
    nodes = [oh.make_node("Conv", ["x", "conv1_w_0", "conv1_b_0"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c"], ["r"]), oh.make_node("ReduceSum", ["r"], ["total"], keepdims=0),
             oh.make_node("Greater", ["total", "minus"], ["cond"]),
             oh.make_node("If", ["cond"], ["u"], then_branch=then, else_branch=other),
             oh.make_node("ReduceMean", ["u", "axes"], ["m"], keepdims=1),
             oh.make_node("Flatten", ["m"], ["f"]), oh.make_node("Gemm", ["f", "fc_w_0", "fc_b_0"], ["y"], transB=1)]
    inits = [*_weights(), nh.from_array(np.array([2, 3], np.int64), "axes"),
             nh.from_array(np.array(-1.0, np.float32), "minus")]
    graph = oh.make_graph(nodes, "g", [_no_shape("x")], [_no_shape("y")], initializer=inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])


def symbolic_image() -> onnx.ModelProto:
    """x [batch, 3, height, width] (every size but the channels symbolic) → Conv → Relu → GlobalAveragePool →
    Flatten → Gemm → y [batch, 10]."""
    nodes = [oh.make_node("Conv", ["x", "conv1_w_0", "conv1_b_0"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c"], ["r"]), oh.make_node("GlobalAveragePool", ["r"], ["m"]),
             oh.make_node("Flatten", ["m"], ["f"]), oh.make_node("Gemm", ["f", "fc_w_0", "fc_b_0"], ["y"], transB=1)]
    return _model(nodes, [oh.make_tensor_value_info("x", F, ["batch", 3, "height", "width"])],
                  [oh.make_tensor_value_info("y", F, ["batch", 10])], _weights())


def recurrent_cell() -> onnx.ModelProto:
    """A recurrent step shaped like a voice-activity model's: audio x [batch, 8], state [1, batch, 16] and an
    int64 sample rate sr (a scalar, no batch axis) → prob [batch, 1] and stateN [1, batch, 16], where
    h' = tanh(x·(sr/16000)·W + h·U)."""
    nodes = [oh.make_node("Cast", ["sr"], ["srf"], to=F), oh.make_node("Div", ["srf", "k16"], ["ratio"]),
             oh.make_node("Mul", ["x", "ratio"], ["xs"]), oh.make_node("MatMul", ["xs", "w"], ["a"]),
             oh.make_node("Squeeze", ["state", "zero"], ["h"]), oh.make_node("MatMul", ["h", "u"], ["b"]),
             oh.make_node("Add", ["a", "b"], ["s"]), oh.make_node("Tanh", ["s"], ["hn"]),
             oh.make_node("MatMul", ["hn", "v"], ["logit"]), oh.make_node("Sigmoid", ["logit"], ["prob"]),
             oh.make_node("Unsqueeze", ["hn", "zero"], ["stateN"])]
    inputs = [oh.make_tensor_value_info("x", F, ["batch", 8]),
              oh.make_tensor_value_info("state", F, [1, "batch", 16]),
              oh.make_tensor_value_info("sr", TensorProto.INT64, [])]
    outputs = [oh.make_tensor_value_info("prob", F, ["batch", 1]),
               oh.make_tensor_value_info("stateN", F, [1, "batch", 16])]
    inits = [_w("w", 8, 16), _w("u", 16, 16, seed=1), _w("v", 16, 1, seed=2),
             nh.from_array(np.array(16000.0, np.float32), "k16"), nh.from_array(np.array([0], np.int64), "zero")]
    return _model(nodes, inputs, outputs, inits)


def loop_steps() -> onnx.ModelProto:
    """x [N, 16] and an int64 scalar trip count (no batch axis) → a Loop of h ← tanh(h·W + x·U) from h = x →
    MatMul → y [N, 3]."""
    body = oh.make_graph(
        [oh.make_node("MatMul", ["h_in", "W"], ["hw"]), oh.make_node("MatMul", ["x", "U"], ["xu"]),
         oh.make_node("Add", ["hw", "xu"], ["s"]), oh.make_node("Tanh", ["s"], ["h_out"]),
         oh.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [oh.make_tensor_value_info("i", TensorProto.INT64, []), oh.make_tensor_value_info("cond_in", BOOL, []),
         oh.make_tensor_value_info("h_in", F, None)],
        [oh.make_tensor_value_info("cond_out", BOOL, []), oh.make_tensor_value_info("h_out", F, None)])
    nodes = [oh.make_node("Loop", ["steps", "true", "x"], ["h"], body=body), oh.make_node("MatMul", ["h", "Wo"], ["y"])]
    inits = [_w("W", 16, 16), _w("U", 16, 16, seed=1), _w("Wo", 16, 3, seed=2), nh.from_array(np.array(True), "true")]
    return _model(nodes, [oh.make_tensor_value_info("x", F, ["N", 16]),
                          oh.make_tensor_value_info("steps", TensorProto.INT64, [])],
                  [oh.make_tensor_value_info("y", F, ["N", 3])], inits)


def masked_attention(fill: float = -np.inf) -> onnx.ModelProto:
    """x [N, 8, 16] → causal self-attention whose masked scores are ``fill`` (-inf, as decoders add by design)
    before the Softmax → y [N, 8, 16]."""
    causal = np.triu(np.ones((8, 8), bool), k=1)
    nodes = [oh.make_node("MatMul", ["x", "wq"], ["q"]), oh.make_node("MatMul", ["x", "wk"], ["k"]),
             oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), oh.make_node("MatMul", ["q", "kt"], ["s"]),
             oh.make_node("Where", ["causal", "fill", "s"], ["masked"]),
             oh.make_node("Softmax", ["masked"], ["p"], axis=-1), oh.make_node("MatMul", ["p", "x"], ["c"]),
             oh.make_node("MatMul", ["c", "wo"], ["y"])]
    inits = [_w("wq", 16, 16), _w("wk", 16, 16, seed=1), _w("wo", 16, 16, seed=2), nh.from_array(causal, "causal"),
             nh.from_array(np.array(fill, np.float32), "fill")]
    return _model(nodes, [oh.make_tensor_value_info("x", F, ["N", 8, 16])],
                  [oh.make_tensor_value_info("y", F, ["N", 8, 16])], inits)


def infinite_output() -> onnx.ModelProto:
    """x [N, 8] → Exp(1000·x) → MatMul → y: the fp32 model overflows to +inf inside and in its output."""
    nodes = [oh.make_node("Mul", ["x", "k"], ["z"]), oh.make_node("Exp", ["z"], ["e"]),
             oh.make_node("MatMul", ["e", "w"], ["y"])]
    return _model(nodes, [oh.make_tensor_value_info("x", F, ["N", 8])], [oh.make_tensor_value_info("y", F, ["N", 4])],
                  [nh.from_array(np.array(1000.0, np.float32), "k"), _w("w", 8, 4)])
