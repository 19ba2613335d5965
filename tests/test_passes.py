"""The rewrite passes (edgequant.graph.passes): each fires where its precondition holds and keeps its promise on
calibration samples, each refuses where it does not hold, and a pass that breaks its promise is undone and named
in the report."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes import PreconditionError

from edgequant.graph import passes as gp
from edgequant.graph.passes import (REGISTRY, BiasCorrection, Equalize, GlobalAveragePool, HardSigmoidAdd,
                                    PadDepthwise, PadInput, PassRun, SmoothQuant, SoftmaxInnerAxis)

RNG = np.random.default_rng(0)


def _init(name: str, shape, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def conv_model(reduce_axes=(2, 3), x_shape=("n", 3, 8, 8)) -> onnx.ModelProto:
    """x (3 channels) → Conv 24 → Relu → depthwise Conv 24 → HardSigmoid → Conv 8 → ReduceMean(axes) → y."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=24, name="dw"),
             helper.make_node("HardSigmoid", ["c2"], ["h"], name="gate"),
             helper.make_node("Conv", ["h", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("ReduceMean", ["c3", "axes"], ["y"], keepdims=0, name="mean")]
    inits = [_init("w1", (24, 3, 3, 3)), _init("b1", (24,)), _init("w2", (24, 1, 3, 3), 1.0), _init("b2", (24,)),
             _init("w3", (8, 24, 1, 1)), _init("b3", (8,)),
             numpy_helper.from_array(np.array(reduce_axes, np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape and list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def matmul_model() -> onnx.ModelProto:
    """x (16 features, two outlier channels) → MatMul(W) → y."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", (16, 8))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def distribution_head(axis: int = 1, perm=(0, 2, 1, 3), opset: int = 18, shared: bool = False) -> onnx.ModelProto:
    """YOLOv8's box distribution: x (n, 64, 6) → Reshape (n, 4, 16, 6) → Transpose(perm) → Softmax(axis) → y;
    ``shared``: the Transpose's output is a graph output too."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="view"),
             helper.make_node("Transpose", ["r"], ["t"], perm=list(perm), name="swap"),
             helper.make_node("Softmax", ["t"], ["y"], axis=axis, name="softmax")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared:
        outs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64, 6])],
                              outs, [numpy_helper.from_array(np.array([-1, 4, 16, 6], np.int64), "shape")])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def samples(shape=(3, 8, 8), n: int = 12) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.uniform(0, 1, shape).astype(np.float32)} for _ in range(n)]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def int8_model(fp32: onnx.ModelProto, data) -> onnx.ModelProto:
    """The QDQ graph edgequant builds for the generic-cpu target, without any int8 rewrite."""
    from edgequant.calibration.streaming import calibrate, tensors_to_calibrate
    from edgequant.quantize.qdq import quantize
    from edgequant.targets import load_target

    tgt = load_target("generic-cpu")
    ranges = calibrate(fp32, data, tensors_to_calibrate(fp32, tgt.quantization.op_types), batch_size=4)
    return quantize(fp32, ranges, tgt)


def run_one(model, p, data, **kwargs):
    checker = PassRun(data, batch_size=4, **kwargs)
    out, details = checker.run(model, [p])
    return out, details, checker.records


# ------------------------------------------------------------------------------------------------ each pass fires
@pytest.mark.parametrize("make, changed", [
    (lambda: GlobalAveragePool(), lambda m: "GlobalAveragePool" in ops(m) and "ReduceMean" not in ops(m)),
    (lambda: Equalize(), lambda m: not np.allclose(numpy_helper.to_array(
        next(i for i in m.graph.initializer if i.name == "w1")), numpy_helper.to_array(_w1()))),
    (lambda: PadDepthwise(16), lambda m: next(a.i for n in m.graph.node for a in n.attribute if a.name == "group")
     == 32),
    (lambda: PadInput(4, spread=True), lambda m: ops(m)[:2] == ["Pad", "Gather"]),
])
def test_each_fp32_pass_fires_and_keeps_the_function(make, changed):
    model, data = conv_model(), samples()
    out, details, records = run_one(model, make(), data)
    (rec,) = records
    assert rec.outcome == "kept", rec
    assert changed(out) and details[rec.name]
    assert rec.measured["max_relative_error"] < 1e-5, rec  # promise: 1e-4 of max|output|


def test_softmax_inner_axis_moves_the_softmax_in_front_of_the_transpose():
    data = [{"x": (RNG.standard_normal((64, 6)) * 4).astype(np.float32)} for _ in range(12)]
    out, details, (rec,) = run_one(distribution_head(), SoftmaxInnerAxis(), data)
    assert rec.outcome == "kept" and details["softmax-inner-axis"] == 1, rec
    assert ops(out) == ["Reshape", "Softmax", "Transpose"]
    assert next(a.i for a in out.graph.node[1].attribute if a.name == "axis") == 2  # perm[1] of (n, 4, 16, 6)
    assert rec.measured["max_relative_error"] == 0.0, rec  # the same sums in the same order
    assert [o.name for o in out.graph.output] == ["y"]


def _w1():
    return next(i for i in conv_model().graph.initializer if i.name == "w1")


def test_smooth_quant_pass_fires_and_keeps_the_function():
    data = [{"x": (RNG.standard_normal(16) * np.r_[[30.0, 20.0], np.ones(14)]).astype(np.float32)} for _ in range(12)]
    out, details, (rec,) = run_one(matmul_model(), SmoothQuant(data, alpha=0.8, batch_size=4, limit=12), data)
    assert rec.outcome == "kept" and details["smooth-quant"] == 1 and "Mul" in ops(out)
    assert rec.measured["max_relative_error"] < 1e-5, rec


@pytest.mark.int8_numerics
def test_int8_passes_fire_and_report_their_sqnr_change():
    fp32, data = conv_model(), samples()
    int8 = int8_model(fp32, data)
    checker = PassRun(data, batch_size=4, reference=fp32, level="basic")
    out, details = checker.run(int8, [BiasCorrection(fp32, data, batch_size=4, limit=12), HardSigmoidAdd()])
    records = checker.records
    assert [(r.name, r.outcome) for r in records] == [("hardsigmoid-add", "kept"), ("bias-correction", "kept")]
    hs, bc = (r.measured for r in records)
    assert details == {"hardsigmoid-add": 1, "bias-correction": 3}
    assert "HardSigmoid" not in ops(out)
    assert hs["sqnr_change_db"] > -3.0 and hs["sqnr_before_db"] > 25.0, hs
    assert bc["sqnr_before_db"] == hs["sqnr_after_db"]  # each pass is measured against the graph before it
    assert bc["sqnr_change_db"] > -0.5, bc


# --------------------------------------------------------------------------------------------- and each refuses
@pytest.mark.parametrize("model, p", [
    (conv_model(reduce_axes=(1,)), GlobalAveragePool()),
    (conv_model(x_shape=None), GlobalAveragePool()),  # unknown rank: no axis arithmetic modulo 0
    (matmul_model(), Equalize()),
    (conv_model(), SmoothQuant([], alpha=0.8, batch_size=4, limit=4)),
    (conv_model(), PadDepthwise(8)),  # 24 channels are a multiple of 8 already
    (conv_model(), PadInput(1, spread=False)),
    (conv_model(), HardSigmoidAdd()),  # fp32: nothing dequantized in front of the HardSigmoid
    (conv_model(), BiasCorrection(conv_model(), [], batch_size=4, limit=4)),
    (distribution_head(axis=-1), SoftmaxInnerAxis()),  # the last axis already
    (distribution_head(perm=(2, 0, 1, 3)), SoftmaxInnerAxis()),  # perm[1] = 0: still an outer axis
    (distribution_head(opset=12), SoftmaxInnerAxis()),  # opset < 13: Softmax flattens from its axis
    (distribution_head(shared=True), SoftmaxInnerAxis()),  # the transposed tensor is read elsewhere too
])
def test_each_pass_refuses_where_its_precondition_fails(model, p):
    assert not p.applies(ir.serde.deserialize_model(model))
    with pytest.raises(PreconditionError):
        p(ir.serde.deserialize_model(model))
    out, details, (rec,) = run_one(model, p, samples())
    assert out is model and details == {} and rec.outcome == "not applicable"


def test_a_pass_that_changes_nothing_costs_no_session(monkeypatch):
    made = []
    monkeypatch.setattr(gp, "session", lambda *a, **k: made.append(1) or _session(*a, **k))
    model = conv_model()
    run_one(model, PadDepthwise(8), samples())
    assert made == []
    run_one(model, PadDepthwise(16), samples())
    assert len(made) == 2  # the graph before and after the pass, once each


def test_a_later_graph_gets_the_first_decision_without_a_second_check(monkeypatch):
    made = []
    monkeypatch.setattr(gp, "session", lambda *a, **k: made.append(1) or _session(*a, **k))
    checker, model = PassRun(samples(), batch_size=4), conv_model()
    first, _ = checker.run(model, [PadDepthwise(16)])
    again, details = checker.run(model, [PadDepthwise(16)])
    assert len(made) == 2 and len(checker.records) == 1 and details["pad-depthwise"][0]["padded"] == 32
    assert first.SerializeToString() == again.SerializeToString()


def _session(*args, **kwargs):
    from edgequant.graph.sessions import session

    return session(*args, **kwargs)


# ------------------------------------------------------------------------------------- a broken pass is undone
def _corrupting(original):
    """An ``apply`` that does the real rewrite, then doubles the first weight it finds."""
    def apply(self, model):
        result = original(self, model)
        w = next(v for v in result.model.graph.initializers.values() if v.const_value.numpy().ndim == 4)
        w.const_value = ir.tensor(w.const_value.numpy() * 2.0, name=w.name)
        return result
    return apply


@pytest.mark.parametrize("cls", [Equalize, PadDepthwise])
def test_a_pass_that_breaks_its_promise_is_undone(monkeypatch, cls):
    monkeypatch.setattr(cls, "apply", _corrupting(cls.apply))
    model = conv_model()
    p = Equalize() if cls is Equalize else PadDepthwise(16)
    out, details, (rec,) = run_one(model, p, samples())
    assert out is model and details == {}
    assert rec.outcome == "undone" and rec.measured["max_relative_error"] > 1e-2, rec
    assert rec.reason.startswith("outputs moved by") and "exact to 0.0001" in rec.reason


def test_a_pass_that_raises_is_undone_and_the_next_still_runs(monkeypatch):
    def fail(self, model):
        raise IndexError("list index out of range")

    monkeypatch.setattr(Equalize, "apply", fail)
    model = conv_model()
    checker = PassRun(samples(), batch_size=4)
    out, details = checker.run(model, [PadDepthwise(16), Equalize()])
    records = checker.records
    assert [(r.name, r.outcome) for r in records] == [("equalize", "undone"), ("pad-depthwise", "kept")]
    assert records[0].reason == "the rewrite raised IndexError: list index out of range"
    assert list(details) == ["pad-depthwise"]


def test_a_pass_that_renames_an_output_breaks_its_postcondition(monkeypatch):
    original = GlobalAveragePool.apply

    def rename(self, model):
        result = original(self, model)
        result.model.graph.outputs[0].name = "renamed"
        return result

    monkeypatch.setattr(GlobalAveragePool, "apply", rename)
    model = conv_model()
    out, details, (rec,) = run_one(model, GlobalAveragePool(), samples())
    assert out is model and rec.outcome == "undone"
    assert rec.reason == "the rewrite raised PostconditionError: global-average-pool changed the graph's outputs"


def test_registry_order_and_the_architecture_pass_list():
    from pathlib import Path

    names = [cls.name for cls in REGISTRY]
    assert names == ["global-average-pool", "softmax-inner-axis", "equalize", "smooth-quant", "pad-depthwise", "pad-input",
                     "hardsigmoid-add", "bias-correction"]
    text = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()
    listed = [n for n in names if f"`{n}`" in text]
    assert listed == names and [text.index(f"`{n}`") for n in names] == sorted(text.index(f"`{n}`") for n in names)


# ---------------------------------------------------------------------------------- named in the export's report
def _tiny_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1, groups=24),
                         nn.Hardsigmoid(), nn.Conv2d(24, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.mark.int8_numerics
@pytest.mark.parametrize("cls", [Equalize, HardSigmoidAdd])
def test_export_undoes_a_broken_pass_and_names_it(monkeypatch, tmp_path, cls):
    from dataclasses import replace

    import edgequant
    from edgequant.check.kernel_choices import CHOICES
    from edgequant.cli import summary
    from edgequant.targets import load_target

    def broken(self, model):  # a rewrite whose output is garbage: every weight of the graph doubled
        result = original(self, model)
        for v in result.model.graph.initializers.values():
            if v.const_value.numpy().dtype in (np.float32, np.int8) and v.const_value.numpy().ndim == 4:
                arr = v.const_value.numpy()
                v.const_value = ir.tensor((arr * 2 if arr.dtype == np.float32 else arr // 2).astype(arr.dtype),
                                          name=v.name)
        return result

    original = cls.apply
    monkeypatch.setattr(cls, "apply", broken)
    x = RNG.uniform(0, 1, (40, 3, 16, 16)).astype(np.float32)
    # the kernel choices asked for explicitly, so that their passes run whatever they measure on this host
    target = replace(load_target("generic-cpu"), explicit=tuple(CHOICES))
    bundle = edgequant.export(_tiny_net(), x, out=tmp_path / "b", progress=False, target=target,
                              algorithms=edgequant.Algorithms(equalize=True))
    rows = {r["name"]: r for r in bundle.report["passes"]}
    assert rows[cls.name]["outcome"] == "undone", rows
    assert rows["global-average-pool"]["outcome"] == "kept" and rows["pad-depthwise"]["outcome"] == "kept"
    algo = bundle.report["algorithms"]
    assert algo["equalized_pairs"] == (0 if cls is Equalize else 1)
    assert algo["int8_hardsigmoid"] == (0 if cls is HardSigmoidAdd else 1)
    assert bundle.report["fidelity"][0]["sqnr_db"] > 20.0, bundle.report["fidelity"]
    line = next(l for l in summary(bundle.report, bundle.path).splitlines() if l.startswith("undone"))
    assert line.startswith(f"undone   rewrite {cls.name}: ") and rows[cls.name]["reason"] in line
