"""Mobile blocks on ONNX Runtime's fast int8 CPU kernels: depthwise convolutions padded to the channel count
MLAS's symmetric depthwise kernels take (multiples of 16 on x86-64), an RGB input padded to 4 channels for the
symmetric dense kernels, HardSigmoid run as an int8 Add. All keep the function: padding exactly, the Add
within half an output step."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.int8_numerics  # padded kernels and the int8 Add run on the host's fused kernels


def _mobile_block():
    """A MobileNetV3-style network: stem, an inverted residual with 72 expanded channels (not a multiple of 16),
    hard-swish, squeeze-excitation with a hard-sigmoid gate, and a classifier."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.Hardswish())
            self.expand = nn.Sequential(nn.Conv2d(24, 72, 1), nn.Hardswish())
            self.dw = nn.Sequential(nn.Conv2d(72, 72, 3, 1, 1, groups=72), nn.Hardswish())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(72, 18, 1), nn.ReLU(), nn.Conv2d(18, 72, 1),
                                    nn.Hardsigmoid())
            self.project = nn.Conv2d(72, 24, 1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

        def forward(self, x):
            s = self.stem(x)
            h = self.dw(self.expand(s))
            return self.head(s + self.project(h * self.se(h)))

    return Block().eval()


def all_choices():
    """generic-cpu with its three kernel choices asked for explicitly: applied whatever they measure here."""
    from dataclasses import replace

    from edgequant.check.kernel_choices import CHOICES
    from edgequant.targets import load_target

    return replace(load_target("generic-cpu"), explicit=tuple(CHOICES))


@pytest.fixture(scope="module")
def mobile_bundle(tmp_path_factory):
    import edgequant

    x = np.random.default_rng(0).uniform(0, 1, (48, 3, 32, 32)).astype(np.float32)
    return edgequant.export(_mobile_block(), x, out=tmp_path_factory.mktemp("mobile") / "b", progress=False,
                            target=all_choices())


def _run(model, x, level="all"):
    from edgequant.graph.sessions import session

    sess = session(model, level=level)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_depthwise_region_and_rgb_input_are_padded_and_compute_the_same(mobile_bundle):
    import onnx

    from edgequant.frontend.torch_export import prepare_fp32
    from edgequant.transforms.channel_pad import pad_depthwise_channels, pad_input_channels

    info = mobile_bundle.report["algorithms"]["padded_depthwise"]
    assert [(i["channels"], i["padded"]) for i in info] == [(72, 80)]
    int8 = onnx.load(mobile_bundle.model_path)
    groups = [a.i for n in int8.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert 80 in groups and 72 not in groups
    fp32 = prepare_fp32(onnx.load(mobile_bundle.fp32_model_path))
    padded, info = pad_depthwise_channels(fp32, 16)
    assert [i["padded"] for i in info] == [80]
    both, inputs = pad_input_channels(padded, 4)
    assert inputs == [{"input": "x", "channels": 3, "padded": 4, "spread": False}]
    spread, wide = pad_input_channels(padded, 4, spread=True)  # what generic-cpu (AVX2-safe weights) does
    assert wide == [{"input": "x", "channels": 3, "padded": 8, "spread": True}]
    assert mobile_bundle.report["algorithms"]["padded_inputs"] == wide
    assert [i.name for i in both.graph.input] == ["x"]  # the model still takes the 3-channel image
    x = np.random.default_rng(1).uniform(-1, 2, (4, 3, 32, 32)).astype(np.float32)
    a = _run(fp32, x, "basic")
    for other in (padded, both, spread):
        assert np.abs(a - _run(other, x, "basic")).max() <= 1e-5 * max(1.0, np.abs(a).max())
    # the stem reads [c0, 0, c1, 0, c2, 0, 0, 0]: no AVX2 pair holds two real weights, so all keep 8 bits
    stem = next(i for i in int8.graph.initializer if len(i.dims) == 4 and i.dims[0] == 24 and i.dims[2] == 3)
    w = onnx.numpy_helper.to_array(stem).astype(int)
    assert w.shape[1] == 8 and not w[:, 1::2].any() and (np.abs(w).reshape(24, -1).max(axis=1) == 127).all()
    # every int8 convolution still runs as QLinearConv, none in float
    kernels = mobile_bundle.report["kernels"]
    assert kernels["int8"].get("QLinearConv", 0) == 6, kernels
    assert not any(k.startswith("Conv:") for k in kernels["float_compute"]), kernels


def test_region_reaching_a_graph_output_is_left_unpadded():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgequant.transforms.channel_pad import pad_depthwise_channels

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(24, 8, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(24, 1, 3, 3)).astype(np.float32), "wd")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["e"], name="expand"),
             helper.make_node("Relu", ["e"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wd"], ["y"], name="dw", group=24, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("r", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, info = pad_depthwise_channels(model, 16)
    assert info == [] and onnx.helper.printable_graph(out.graph) == onnx.helper.printable_graph(model.graph)


def test_hardsigmoid_runs_as_an_int8_add_within_one_step(mobile_bundle):
    import onnx

    from edgequant.check.fidelity import fidelity

    kernels = mobile_bundle.report["kernels"]
    assert not any(k.startswith(("HardSigmoid", "HardSwish")) for k in kernels["float_compute"]), kernels
    # the hard-swish gates (3) and the SE gate (1) are Adds now; the residual Add is the fifth
    assert kernels["int8"].get("QLinearAdd", 0) == 5, kernels
    int8 = onnx.load(mobile_bundle.model_path)
    assert not any(n.op_type == "HardSigmoid" for n in int8.graph.node)
    (fid,) = fidelity(onnx.load(mobile_bundle.fp32_model_path), int8, [{"x": x} for x in _held_out()],
                      batch_size=8, level="basic")
    assert fid.sqnr_db > 20, fid


def _held_out():
    return np.random.default_rng(7).uniform(0, 1, (16, 3, 32, 32)).astype(np.float32)


def test_hardsigmoid_add_matches_the_float_op_on_every_code():
    """One DQ → HardSigmoid → Q → DQ over all 256 input codes (uint8 and int8 zero points): the rewritten
    graph gives HardSigmoid's value within one step of 1/255, in exact arithmetic."""
    from onnx import TensorProto, helper, numpy_helper

    from edgequant.quantize.hardsigmoid import int8_hardsigmoid

    for dtype, proto, lo in ((np.uint8, TensorProto.UINT8, 0), (np.int8, TensorProto.INT8, -128)):
        inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                 numpy_helper.from_array(np.array(lo + 120, dtype), "xz"),
                 numpy_helper.from_array(np.array(1 / 255, np.float32), "hs"),
                 numpy_helper.from_array(np.array(lo, dtype), "hz")]
        nodes = [helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["x"], name="dq"),
                 helper.make_node("HardSigmoid", ["x"], ["h"], name="hsig", alpha=1 / 6, beta=0.5),
                 helper.make_node("QuantizeLinear", ["h", "hs", "hz"], ["hq"], name="qh"),
                 helper.make_node("DequantizeLinear", ["hq", "hs", "hz"], ["y"], name="dqh")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", proto, [256])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        codes = np.arange(lo, lo + 256).astype(dtype)
        want = np.clip((codes.astype(np.float32) - (lo + 120)) * 0.05 / 6 + 0.5, 0, 1)
        assert int8_hardsigmoid(model) == 1
        assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "DequantizeLinear", "Add",
                                                         "QuantizeLinear", "DequantizeLinear"]
        from edgequant.graph.sessions import session

        got = session(model, level="basic").run(None, {"q": codes})[0]
        assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6, np.abs(got - want).max()
        assert got.min() == 0.0 and got.max() == pytest.approx(1.0)


def test_export_summary_names_the_kernel_choices(mobile_bundle):
    from edgequant.cli import summary

    assert mobile_bundle.report["algorithms"]["int8_hardsigmoid"] == 4
    line = next(l for l in summary(mobile_bundle.report, mobile_bundle.path).splitlines() if l.startswith("kernels"))
    assert line == ("kernels  for the target's int8 kernels: 1 depthwise convolution padded to 80 channels; "
                    "input x padded from 3 to 8 channels; 4 HardSigmoid as int8 Add"), line
