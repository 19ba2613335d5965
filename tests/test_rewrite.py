"""Graph rewrites: each fires where it should (same numbers) and refuses where it must not."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgequant.graph.rewrite import rewrite_for_int8
from edgequant.check.fidelity import session


def reduce_mean_model(axes, keepdims: int, as_output: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5, 6])
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=keepdims, name="rm")]
    out_name = "m"
    if not as_output:
        nodes.append(helper.make_node("Relu", ["m"], ["y"]))
        out_name = "y"
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)
    axes_init = helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)
    graph = helper.make_graph(nodes, "g", [x], [y], [axes_init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def run(model, x):
    return session(model).run(None, {"x": x})[0]


def test_spatial_reduce_mean_becomes_global_average_pool():
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 6)).astype(np.float32)
    for axes in ([2, 3], [-1, -2]):
        for keepdims in (0, 1):
            for as_output in (True, False):
                model = reduce_mean_model(axes, keepdims, as_output)
                new = rewrite_for_int8(model)
                ops = [n.op_type for n in new.graph.node]
                assert "ReduceMean" not in ops and "GlobalAveragePool" in ops
                assert ("Flatten" in ops) == (keepdims == 0)
                assert [i.name for i in new.graph.initializer] == []  # the axes constant went with it
                assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
                np.testing.assert_allclose(run(new, x), run(model, x), rtol=1e-6, atol=1e-6)
                assert [n.op_type for n in model.graph.node][0] == "ReduceMean"  # input untouched


def test_other_reductions_are_left_alone():
    for axes in ([1], [1, 2, 3], [3]):
        model = reduce_mean_model(axes, 1, True)
        assert [n.op_type for n in rewrite_for_int8(model).graph.node] == ["ReduceMean"]
