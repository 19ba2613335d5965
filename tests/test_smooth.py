"""The shared SmoothQuant rewrite on small graphs: folding into a LayerNormalization where it is exact, a float
Mul where another reader needs the unscaled activation. (Real-model checks: tests/test_hf.py and
tests/test_transformer_algorithms.py.)"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgequant.transforms.algorithms import smooth_quant
from edgequant.transforms.smooth import smooth_graph, smooth_muls

C = 8


def _norm_then_matmul(residual: bool):
    """x → LayerNormalization(γ, β) → h → MatMul(W) → y, and with ``residual`` also r = h + x."""
    rng = np.random.default_rng(0)
    gamma = np.ones(C, np.float32)
    gamma[3] = 40.0  # one outlier channel, as LayerNorm outputs of transformers have
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(rng.standard_normal(C).astype(
        np.float32), "beta"), numpy_helper.from_array(rng.standard_normal((C, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])]
    if residual:
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"], name="add"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", C]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_smoothing_folds_into_layernorm_only_where_exact():
    x = np.random.default_rng(2).standard_normal((5, C)).astype(np.float32)
    samples = [{"x": row} for row in x]
    for residual, muls, smoothed_name in ((False, 0, "h"), (True, 1, "h_smoothed")):
        model = _norm_then_matmul(residual)
        before = model.SerializeToString()
        smoothed, count = smooth_quant(model, samples, batch_size=2)
        assert model.SerializeToString() == before and count == 1
        assert len(smooth_muls(smoothed)) == muls == sum(n.op_type == "Mul" for n in smoothed.graph.node)
        run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
               for m in (model, smoothed)]
        assert all(np.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(*run))
        mm = next(n for n in smoothed.graph.node if n.op_type == "MatMul")
        assert mm.input[0] == smoothed_name
        stats = {"h": (np.full(C, -1, np.float32), np.where(np.arange(C) == 3, 40.0, 1.0).astype(np.float32))}
        ranges = smooth_graph(model, stats).ranges
        assert ranges[smoothed_name][1] < 40 / 4  # the outlier channel is flattened, folded or not


def _siblings(bias_on: tuple[bool, ...], widths=(4, 6, 4)):
    """x → MatMul(W_i) [→ Add(b_i)] → y_i for each i, every y_i a graph output."""
    rng = np.random.default_rng(1)
    inits, nodes, outputs = [], [], []
    for i, (bias, width) in enumerate(zip(bias_on, widths)):
        inits.append(numpy_helper.from_array(rng.standard_normal((C, width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}" if bias else f"y{i}"], name=f"mm{i}"))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [f"b{i}", f"m{i}"], [f"y{i}"], name=f"add{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_sibling_matmuls_merge_with_or_without_bias_and_keep_output_names():
    from edgequant.transforms.concat_linear import concat_linear

    x = np.random.default_rng(3).standard_normal((5, C)).astype(np.float32)
    for bias_on, merges in (((True, True, True), 1), ((False, False, False), 1), ((True, False, True), 0)):
        model = _siblings(bias_on)
        merged, count = concat_linear(model)
        assert count == merges, bias_on
        ops = [n.op_type for n in merged.graph.node]
        assert ops.count("MatMul") == (1 if merges else 3) and ops.count("Split") == merges
        assert [o.name for o in merged.graph.output] == ["y0", "y1", "y2"]
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
        got = ort.InferenceSession(merged.SerializeToString()).run(None, {"x": x})
        assert all(np.max(np.abs(a - b)) < 1e-5 for a, b in zip(want, got)), bias_on
