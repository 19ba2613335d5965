"""QAT export clean-ups on hand-built QDQ graphs: each fires where it should (same numbers, int8 kernels) and
refuses where it must not."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgequant.qat.convert import int8_groups, strip_qdq
from edgequant.check.fidelity import cpu_kernels, session

RNG = np.random.default_rng(0)


def qdq_conv(quantized_input: bool = True) -> onnx.ModelProto:
    """x → Q/DQ (u8) → Conv(w: Q/DQ per channel s8, float bias) → Q/DQ → y, as the QAT exporter writes it."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    s_w = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w, "w"), (s_w, "s_w"), (np.zeros(4, np.int8), "z_w"), (RNG.standard_normal(4).astype(np.float32), "b"),
        (np.array(0.02, np.float32), "s_x"), (np.array(128, np.uint8), "z_x"),
        (np.array(0.05, np.float32), "s_y"), (np.array(128, np.uint8), "z_y")]]
    nodes = [helper.make_node("QuantizeLinear", ["w", "s_w", "z_w"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "s_w", "z_w"], ["wd"], axis=0)]
    x_in = "x"
    if quantized_input:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"])]
        x_in = "xd"
    nodes += [helper.make_node("Conv", [x_in, "wd", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
              helper.make_node("QuantizeLinear", ["c", "s_y", "z_y"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "s_y", "z_y"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model, x):
    return session(model, level="disable").run(None, {"x": x})[0]


def test_int8_weights_and_int32_bias_fuse_into_qlinearconv():
    model = qdq_conv()
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    new = int8_groups(model, ["y"])
    inits = {i.name: i for i in new.graph.initializer}
    assert "w" not in inits and inits["w_quantized"].data_type == TensorProto.INT8
    assert inits["b_quantized"].data_type == TensorProto.INT32
    bias_scale = numpy_helper.to_array(inits["b_scale"])
    assert np.allclose(bias_scale, 0.02 * numpy_helper.to_array(inits["s_w"]))
    assert cpu_kernels(new).int8 == {"QLinearConv": 1} and not cpu_kernels(new).float_compute
    # the same numbers up to the bias rounding (half an int32 step, far below one output step of 0.05)
    assert np.abs(run(model, x) - run(new, x)).max() <= 0.05 + 1e-6


def test_float_input_keeps_the_float_bias():
    new = int8_groups(qdq_conv(quantized_input=False), ["y"])
    inits = {i.name: i for i in new.graph.initializer}
    assert "b" in inits and "b_quantized" not in inits               # no input scale: nothing to round to
    assert inits["w_quantized"].data_type == TensorProto.INT8


def test_strip_qdq_gives_the_float_graph():
    model = qdq_conv()
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    fp32 = strip_qdq(model)
    assert [n.op_type for n in fp32.graph.node] == ["Conv"] and fp32.graph.output[0].name == "c"
    w, b = (numpy_helper.to_array(i) for i in model.graph.initializer[:1] + model.graph.initializer[3:4])
    ref = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]),
        opset_imports=[helper.make_opsetid("", 18)])
    assert np.array_equal(run(fp32, x), run(ref, x))
