"""Kernel choices decided per model: the decision logic on injected latencies (no timing in tests), the cost model
on hand-counted MACs, the stage on a real export, and a user's explicit choice honoured with one warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest

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
    assert [d["key"] for d in c["decisions"]] == ["depthwise_channel_align", "input_channel_align",
                                                  "int8_hardsigmoid"]
    assert all(0.2 < d["ratio"] < 5 and d["how"] == "measured" for d in c["decisions"]), c
    assert c["kept"] == [d["key"] for d in c["decisions"] if d["kept"]]
    q = mobile_export.manifest["quantization"]
    nodes = [n.op_type for n in onnx.load(str(mobile_export.model_path)).graph.node]
    assert (q["depthwise_channel_align"] == 16) == ("depthwise_channel_align" in c["kept"])
    assert (q["int8_hardsigmoid"] is True) == ("int8_hardsigmoid" in c["kept"]) == ("HardSigmoid" not in nodes)
    assert bool(mobile_export.report["algorithms"].get("padded_inputs")) == ("input_channel_align" in c["kept"])
    line = next(l for l in summary(mobile_export.report, mobile_export.path).splitlines() if l.startswith("choices"))
    assert line.startswith("choices  measured on x86_64") and all(d["key"] in line for d in c["decisions"]), line


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
