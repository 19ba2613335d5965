"""Hand-made ONNX graphs for the bad-input tests: old opsets with initializers listed as graph inputs (IR 3
style), batch axes other than 0, recurrent state, scalar/int64/bool inputs, If subgraphs, unknown ranks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

F = TensorProto.FLOAT


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
