"""Kernel choices decided per model: the decision logic on injected latencies (no timing in tests), the cost model
on hand-counted MACs, the stage on a real export, and a user's explicit choice honoured with one warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from edgequant.check.kernel_choices import decide, paired_ratio


def _timer(medians: dict[str, float], noise: float = 0.002, calls: list | None = None, rounds: int = 200):
    """A timer that returns, for each model name, ``rounds`` rounds around the given median latency (ms)."""
    rng = np.random.default_rng(0)

    def timer(models, inputs):
        if calls is not None:
            calls.append(sorted(models))
        shared = rng.normal(0, 0.05, rounds)  # the machine's noise, common to a round
        return {k: medians[k] * (1 + shared + rng.normal(0, noise, rounds)) for k in models}

    return timer


def _no_build(keys):
    raise AssertionError(f"build({keys}) was not expected")


def test_paired_ratio_sees_through_noise_common_to_a_round():
    rng = np.random.default_rng(1)
    shared = np.exp(rng.normal(0, 0.3, 100))  # rounds 30% apart: a busy machine
    ratio, noise = paired_ratio(0.9 * shared, shared * (1 + rng.normal(0, 0.001, 100)))
    assert ratio == pytest.approx(0.9, abs=0.002) and noise < 0.002


def test_choices_that_pay_are_kept_and_the_others_dropped():
    variants = {"plain": "p", "pays": "a", "costs": "b", "within_noise": "c", "all": "abc"}
    result = decide(variants, {}, build=_no_build,
                    timer=_timer({"plain": 10.0, "pays": 8.0, "costs": 11.0, "within_noise": 9.97, "all": 9.0}))
    by_key = {d.key: d for d in result.decisions}
    assert result.kept == ("pays",) and result.fallback is None
    assert by_key["pays"].ratio == pytest.approx(0.8, abs=0.005) and by_key["pays"].how == "measured"
    assert by_key["costs"].ratio == pytest.approx(1.1, abs=0.005) and not by_key["costs"].kept
    assert not by_key["within_noise"].kept  # 0.3% is below MIN_GAIN
    assert result.ratio_vs_plain == pytest.approx(0.8, abs=0.005)  # the kept set alone is "pays" itself
    assert result.rounds == 200


def test_a_kept_set_not_among_the_variants_is_built_and_timed_against_plain():
    calls, built = [], []
    medians = {"plain": 10.0, "a": 9.0, "b": 9.0, "c": 12.0, "all": 11.0}

    def build(keys):
        built.append(list(keys))
        return "ab"

    timer = _timer(medians, calls=calls)
    medians_second = {**medians, "all": 8.1}  # the second call times plain against "a and b"
    result = decide({"plain": "p", "a": "a", "b": "b", "c": "c", "all": "abc"}, {}, build=build,
                    timer=lambda m, x: _timer(medians_second)(m, x) if len(calls) else timer(m, x))
    assert built == [["a", "b"]] and result.kept == ("a", "b")
    assert result.ratio_vs_plain == pytest.approx(0.81, abs=0.005)


def test_a_set_slower_than_plain_together_falls_back_to_plain():
    result = decide({"plain": "p", "a": "a", "b": "b", "all": "ab"}, {}, build=_no_build,
                    timer=_timer({"plain": 10.0, "a": 9.0, "b": 9.0, "all": 10.5}))
    assert result.kept == () and result.ratio_vs_plain == 1.0
    assert "1.05" in result.fallback and "plain written" in result.fallback


def test_a_fallback_to_plain_keeps_every_explicit_choice_even_one_that_pays():
    # asked for explicitly: "a" pays alone, "b" costs; together slower than plain with "c" (measured, paying):
    # the fallback drops "c" only
    result = decide({"plain": "p", "a": "a", "b": "b", "c": "c", "all": "abc"}, {}, build=_no_build,
                    explicit=["a", "b"], timer=_timer({"plain": 10.0, "a": 9.0, "b": 11.0, "c": 9.0, "all": 10.8}))
    assert result.kept == ("a", "b") and result.fallback is not None
    assert {d.key: d.kept for d in result.decisions} == {"a": True, "b": True, "c": False}


def test_an_explicit_choice_is_kept_with_one_warning_saying_what_it_costs(caplog):
    with caplog.at_level(logging.WARNING, logger="edgequant"):
        result = decide({"plain": "p", "forced": "f"}, {}, build=_no_build, explicit=["forced"],
                        timer=_timer({"plain": 10.0, "forced": 11.5}))
    (d,) = result.decisions
    assert d.kept and d.how == "explicit" and d.ratio == pytest.approx(1.15, abs=0.005)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "forced" in warnings[0] and f"{d.ratio:.3f}x the latency" in warnings[0], warnings


def _dw_model(channels: int, cin: int = 3, size: int = 16):
    """fp32 ONNX: a dense 3×3 stem (cin → channels) and a 3×3 depthwise Conv."""
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.ones((channels, cin, 3, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((channels, 1, 3, 3), np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1], group=channels)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_cost_model_counts_macs_and_the_slow_depthwise_kernel():
    from edgequant.check.kernel_cost import DENSE_SLOW, DEPTHWISE_SLOW, graph_cost

    shape = {"x": (1, 4, 16, 16)}
    stem, dw = 256 * 72 * 4 * 9, 256 * 72 * 9  # output pixels × channels × MACs per output
    assert graph_cost(_dw_model(72, cin=4), shape, 8) == stem + dw  # 72 = 9 × 8: ARM's fast kernel
    assert graph_cost(_dw_model(72, cin=4), shape, 16) == stem + DEPTHWISE_SLOW * dw  # x86-64 needs 16s
    assert graph_cost(_dw_model(72, cin=3), {"x": (1, 3, 16, 16)}, 8) == DENSE_SLOW * stem * 3 / 4 + dw


def test_cost_model_keeps_depthwise_padding_on_x86_not_on_arm_and_refuses_the_rgb_spread():
    from edgequant.check.kernel_cost import decide_by_cost

    shape = {"x": (1, 3, 16, 16)}
    dw = {"plain": _dw_model(72), "depthwise_channel_align": _dw_model(80)}
    assert decide_by_cost(dw, shape, 16).kept == ("depthwise_channel_align",)
    assert decide_by_cost(dw, shape, 8).kept == ()
    spread = {"plain": _dw_model(72), "input_channel_align": _dw_model(72, cin=8)}
    four = {"plain": _dw_model(72), "input_channel_align": _dw_model(72, cin=4)}
    assert decide_by_cost(spread, shape, 8).kept == () and decide_by_cost(four, shape, 8).kept == ("input_channel_align",)


def test_cost_model_keeps_the_softmax_rewrite_and_cannot_judge_float_nodes():
    """Where the build machine cannot run the target's kernels: the exact Softmax rewrite adds no MACs and is kept;
    per-node int8-or-float needs kernel times, so every node stays int8."""
    from edgequant.check.kernel_cost import decide_by_cost

    shape = {"x": (1, 3, 16, 16)}
    result = decide_by_cost({"plain": _dw_model(72), "softmax_inner_axis": _dw_model(72),
                             "float_where_faster": _dw_model(72)}, shape, 8)
    assert result.kept == ("softmax_inner_axis",) and result.method == "cost model"
    (fl,) = [d for d in result.decisions if d.key == "float_where_faster"]
    assert not fl.kept and "kernel times" in fl.why


@pytest.fixture(scope="module")
def mobile_export(tmp_path_factory):
    """The MobileNetV3-style block exported for generic-cpu with the real timer."""
    import edgequant
    from test_mobile_kernels import _mobile_block

    x = np.random.default_rng(0).uniform(0, 1, (32, 3, 32, 32)).astype(np.float32)
    return edgequant.export(_mobile_block(), x, out=tmp_path_factory.mktemp("choices") / "b", progress=False,
                            layer_report=False)


def test_the_bundle_records_the_choices_and_applies_only_the_kept_ones(mobile_export):
    import onnx

    from edgequant.cli import summary

    c = mobile_export.report["kernel_choices"]
    assert c["method"] == "measured" and c["rounds"] >= 15 and 0 < c["seconds"] < 60
    assert {d["key"] for d in c["decisions"]} == {"depthwise_channel_align", "input_channel_align",
                                                  "int8_hardsigmoid", "softmax_inner_axis", "float_where_faster"}
    timed = [d for d in c["decisions"] if d["how"] != "not applicable"]
    assert all(0.2 < d["ratio"] < 5 and d["how"] == "measured" for d in timed), c
    (soft,) = [d for d in c["decisions"] if d["key"] == "softmax_inner_axis"]
    assert soft["how"] == "not applicable" and not soft["kept"]  # no Softmax here
    # float_where_faster: ONNX Runtime's profiles of plain int8 and fp32 matched every Conv/Gemm of the block
    profiled = c["float_where_faster"]
    assert profiled["profiled_nodes"] == 7, profiled
    floats = [t["node"] for t in profiled["slower_in_int8"]]
    assert all(t["int8_ms"] > t["float_ms"] + t["switch_ms"] + 0.02 for t in profiled["slower_in_int8"]), profiled
    assert c["kept"] == [d["key"] for d in c["decisions"] if d["kept"]]
    q = mobile_export.manifest["quantization"]
    nodes = [n.op_type for n in onnx.load(str(mobile_export.model_path)).graph.node]
    assert (q["depthwise_channel_align"] == 16) == ("depthwise_channel_align" in c["kept"])
    assert (q["int8_hardsigmoid"] is True) == ("int8_hardsigmoid" in c["kept"]) == ("HardSigmoid" not in nodes)
    assert bool(mobile_export.report["algorithms"].get("padded_inputs")) == ("input_channel_align" in c["kept"])
    graph = onnx.load(str(mobile_export.model_path)).graph
    weight_dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    float_now = {n.name for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] not in weight_dq}
    assert float_now == (set(floats) if "float_where_faster" in c["kept"] else set()), (float_now, floats)
    assert q["float_where_faster"] == ("float_where_faster" in c["kept"])
    line = next(l for l in summary(mobile_export.report, mobile_export.path).splitlines() if l.startswith("choices"))
    assert line.startswith("choices  measured on x86_64") and all(d["key"] in line for d in timed), line
    assert "softmax_inner_axis" not in line  # not applicable: not listed


class _DistributionHead(torch.nn.Module):
    """A CNN ending in YOLOv8's box distribution: 64 channels → (n, 4, 16, anchors) → Softmax over the 16 bins
    (an outer axis after the transpose) → expected bin by a fixed 1×1 Conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 1))
        self.dfl = torch.nn.Conv2d(16, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1)

    def forward(self, x):
        f = self.body(x).flatten(2)  # (n, 64, anchors)
        return self.dfl(f.view(f.shape[0], 4, 16, -1).transpose(2, 1).softmax(1)).view(f.shape[0], 4, -1)


@pytest.mark.host_kernels
def test_the_softmax_axis_choice_is_timed_and_applied_as_decided(tmp_path):
    import onnx

    import edgequant

    x = np.random.default_rng(0).uniform(0, 1, (32, 3, 64, 64)).astype(np.float32)
    b = edgequant.export(_DistributionHead().eval(), x, out=tmp_path / "b", progress=False, layer_report=False)
    (d,) = [d for d in b.report["kernel_choices"]["decisions"] if d["key"] == "softmax_inner_axis"]
    assert d["how"] == "measured" and 0.2 < d["ratio"] < 5, d
    nodes = onnx.load(str(b.model_path)).graph.node
    (soft,) = [n for n in nodes if n.op_type == "Softmax"]
    moved = onnx.helper.get_node_attr_value(soft, "axis") == 2  # over the bins of (n, 4, 16, anchors), not axis 1
    assert moved == d["kept"] == (b.report["algorithms"].get("softmax_inner_axis", 0) == 1) \
        == b.manifest["quantization"]["softmax_inner_axis"], (d, b.report["algorithms"])
    if moved:
        (row,) = [r for r in b.report["passes"] if r["name"] == "softmax-inner-axis"]
        assert row["outcome"] == "kept" and row["measured"]["max_relative_error"] == 0.0, row
    assert b.report["fidelity"][0]["sqnr_db"] > 25.0, b.report["fidelity"]


def test_a_users_profile_key_is_honoured_where_the_cost_model_refuses_it(tmp_path, caplog):
    """arm64 with depthwise_channel_align = 16 from the user's own file: 72 channels are already ARM's multiple of 8,
    so the cost model finds no gain, but the key was asked for — kept, one warning, recorded as explicit."""
    from importlib import resources

    import edgequant
    from edgequant.targets import load_target
    from test_mobile_kernels import _mobile_block

    profile = tmp_path / "my-arm.toml"
    text = resources.files("edgequant._toolchains").joinpath("arm64.toml").read_text()
    profile.write_text(text.replace("[quantization]", "[quantization]\ndepthwise_channel_align = 16", 1))
    assert load_target(profile).explicit and "depthwise_channel_align" in load_target(profile).explicit
    x = np.random.default_rng(0).uniform(0, 1, (24, 3, 32, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="edgequant"):
        b = edgequant.export(_mobile_block(), x, out=tmp_path / "b", progress=False, target=str(profile),
                             layer_report=False)
    (d,) = [d for d in b.report["kernel_choices"]["decisions"] if d["key"] == "depthwise_channel_align"]
    assert b.report["kernel_choices"]["method"] == "cost model"
    assert d["kept"] and d["how"] == "explicit" and d["ratio"] > 1.0, d
    assert b.report["algorithms"]["padded_depthwise"][0]["padded"] == 80
    warnings = [r.getMessage() for r in caplog.records if "depthwise_channel_align" in r.getMessage()]
    assert len(warnings) == 1 and f"{d['ratio']:.3f}x the cost" in warnings[0], warnings
    assert load_target("generic-cpu").explicit == ()


def test_a_gain_hidden_by_noise_is_timed_again_and_pooled():
    calls = []
    result = decide({"plain": "p", "a": "a"}, {}, build=_no_build, max_extra=2,
                    timer=_timer({"plain": 10.0, "a": 9.7}, noise=0.1, calls=calls, rounds=20))
    assert len(calls) == 3 and result.rounds == 60  # 3% gain inside ±10% per-run noise: two more timings
    assert not result.kept and result.decisions[0].noise > 0.03
    quiet = []
    result = decide({"plain": "p", "a": "a"}, {}, build=_no_build,
                    timer=_timer({"plain": 10.0, "a": 9.7}, calls=quiet, rounds=20))
    assert len(quiet) == 1 and result.kept == ("a",)


def test_node_profiles_trace_every_int8_and_float_kernel_back_to_its_node(monkeypatch):
    """ONNX Runtime's profiles of a plain QDQ graph (QLinearConv) and its fp32 graph (NCHWc Conv with fused Relu):
    each of the three convolutions is found in both, with its own kernel time."""
    from test_passes import conv_model, int8_model, samples

    from edgequant.check import node_times

    fp32, data = conv_model(), samples()
    qdq = int8_model(fp32, data)
    x = {"x": data[0]["x"][None]}
    monkeypatch.setattr(node_times, "MIN_NODE_GAIN_MS", -np.inf)  # every matched node listed
    slower, matched = node_times.slower_in_int8(fp32, qdq, x, threads=1, level="all")
    assert {t.node for t in matched} == {"conv1", "dw", "conv3"}, matched
    assert all(t.int8_ms > 0 and t.float_ms > 0 for t in matched), matched
    assert [t.node for t in slower] == [t.node for t in matched]  # slowest first
    assert [t.gain_ms for t in matched] == sorted((t.gain_ms for t in matched), reverse=True)
    # conv1 reads the graph input: in float it saves the input's QuantizeLinear (3×8×8) and quantizes its output
    # (24×8×8); dw dequantizes its input and quantizes its output (24×8×8 each), at one cost per element
    switch = {t.node: t.switch_ms for t in matched}
    assert switch["dw"] > 0 and switch["conv1"] / switch["dw"] == pytest.approx((24 - 3) / 48, rel=1e-6), switch


def test_nodes_slower_in_int8_stay_float_where_the_whole_graph_is_faster(monkeypatch, tmp_path):
    """The per-node choice's plumbing with its figures injected: the profiles name the stem, the timer finds the
    graph with the stem in float faster → the bundle's stem is a float Conv, the report lists it, and the
    manifest says float_where_faster; with the timer finding it slower, every node is int8."""
    import onnx

    import edgequant
    from edgequant.check.node_times import NodeTime
    from edgequant.jobs import choices

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 4)).eval()
    x = np.random.default_rng(0).uniform(0, 1, (24, 3, 32, 32)).astype(np.float32)
    stems = []

    def profiles(fp32, qdq, inputs, *, threads, level):
        stem = next(n.name for n in fp32.graph.node if n.op_type == "Conv")
        stems.append(stem)
        t = NodeTime(stem, 0.5, 0.2, 0.1)
        return [t], [t]

    for float_ms, kept in ((8.0, True), (12.0, False)):
        def timer(models, inputs, float_ms=float_ms):
            return {k: np.full(30, float_ms if k == choices.FLOAT else 10.0) for k in models}

        monkeypatch.setattr(choices, "slower_in_int8", profiles)
        monkeypatch.setattr(choices, "_timer", lambda run, timer=timer: timer)
        b = edgequant.export(model, x, out=tmp_path / f"b{kept}", progress=False, layer_report=False,
                             target="generic-cpu")
        c = b.report["kernel_choices"]
        (d,) = [d for d in c["decisions"] if d["key"] == "float_where_faster"]
        assert d["kept"] == kept and d["how"] == "measured" and stems[-1] in d["why"], d
        assert c["float_where_faster"]["slower_in_int8"][0]["node"] == stems[-1]
        graph = onnx.load(str(b.model_path)).graph
        weight_dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        float_convs = [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] not in weight_dq]
        assert float_convs == ([stems[-1]] if kept else []), float_convs
        assert b.manifest["quantization"]["float_where_faster"] is kept


def test_a_failing_profile_leaves_every_node_int8_and_the_export_goes_on(monkeypatch, tmp_path, caplog):
    import edgequant
    from edgequant.jobs import choices

    def broken(*args, **kwargs):
        raise RuntimeError("profiling is not available")

    monkeypatch.setattr(choices, "slower_in_int8", broken)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 14 * 14, 3)).eval()
    x = np.random.default_rng(0).uniform(0, 1, (24, 3, 16, 16)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="edgequant"):
        b = edgequant.export(model, x, out=tmp_path / "b", progress=False, layer_report=False)
    (d,) = [d for d in b.report["kernel_choices"]["decisions"] if d["key"] == "float_where_faster"]
    assert not d["kept"] and b.manifest["quantization"]["float_where_faster"] is False
    assert b.report["kernels"]["float_compute"] == [], b.report["kernels"]
    assert any("per-node profiles failed (RuntimeError: profiling is not available)" in r.getMessage()
               for r in caplog.records)
