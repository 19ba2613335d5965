"""``edgequant inspect``: which nodes run in int8 on the bundle's providers, why, and the int8 share of MACs."""

from __future__ import annotations

import json

import edgequant
from edgequant.inspection import inspect_bundle

from conftest import DIGITS
from test_cli import invoke

# DigitsCNN, one 8×8 sample: Conv 1→16 (8×8 out, 3×3), Conv 16→32 (8×8), MaxPool, Conv 32→64 (4×4), Linear 64→10
CONV1, CONV2, CONV3, LINEAR = 16 * 64 * 9, 32 * 64 * 16 * 9, 64 * 16 * 32 * 9, 10 * 64


def test_cpu_placement_comes_from_ort_and_counts_macs(digits_bundle):
    result = inspect_bundle(digits_bundle)
    assert result.total_macs == CONV1 + CONV2 + CONV3 + LINEAR
    assert result.int8_mac_share == 1.0
    rows = {r.op_type: r for r in result.nodes}
    assert rows["Conv"].reason == "ONNX Runtime fused it into QLinearConv"
    assert rows["Gemm"].reason == "ONNX Runtime fused it into QGemm" and rows["Gemm"].macs == LINEAR
    assert rows["MaxPool"].precision == "int8" and "directly on 8-bit data" in rows["MaxPool"].reason
    assert {r.provider for r in result.nodes} == {"CPUExecutionProvider"}


def test_float_conv_lowers_the_share_and_ort_decides_on_the_cpu(digits_bundle, tmp_path):
    def build(node):
        return edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=tmp_path / node, num_samples=40,
                                exclude_nodes=[node], progress=False)

    result = inspect_bundle(build("node_Conv_28"))
    first = next(r for r in result.nodes if r.node == "node_Conv_28")  # its input x gets no Q/DQ: float
    assert first.precision == "float" and first.macs == CONV1 and first.reason.startswith("CPUExecutionProvider: not quantized")
    assert abs(result.int8_mac_share - (CONV2 + CONV3 + LINEAR) / result.total_macs) < 1e-12
    # an excluded Conv that reads a quantized tensor: ONNX Runtime quantizes its weight itself and fuses it
    rows = {r.node: r for r in inspect_bundle(build("node_Conv_29")).nodes}
    assert rows["node_Conv_29"].precision == "int8" and rows["node_Conv_29"].reason.endswith("QLinearConv")
    assert rows["node_relu_1"].precision == "fused"


def test_declared_provider_refuses_a_dtype_and_the_next_one_takes_it(digits_bundle):
    # the default bundle has uint8 activations with int8 weights, which XNNPACK never takes
    result = inspect_bundle(digits_bundle, target="rpi5-xnnpack")
    conv = next(r for r in result.nodes if r.op_type == "Conv")
    assert conv.provider == "CPUExecutionProvider" and conv.precision == "int8"
    assert conv.reason.startswith("XnnpackExecutionProvider: refuses uint8/int8 (activation/weight)")
    pool = next(r for r in result.nodes if r.op_type == "MaxPool")
    assert pool.provider == "XnnpackExecutionProvider"


def test_provider_without_the_op_and_basic_level_cpu_leave_float(target_bundle):
    result = inspect_bundle(target_bundle("android-nnapi"))
    gap = next(r for r in result.nodes if r.op_type == "GlobalAveragePool")
    assert gap.precision == "float" and gap.provider == "CPUExecutionProvider"
    assert gap.reason == ("NnapiExecutionProvider: no int8 GlobalAveragePool kernel; CPUExecutionProvider: ONNX "
                          "Runtime runs DQ -> float GlobalAveragePool -> Q (optimization level basic: no QDQ fusion)")
    assert {r.provider for r in result.nodes if r.op_type in ("Conv", "Gemm")} == {"NnapiExecutionProvider"}
    assert result.int8_mac_share == 1.0


def test_cli_inspect_table_and_json(digits_bundle, target_bundle):
    out = invoke("inspect", digits_bundle.path)
    assert out.exit_code == 0, out.output
    assert out.output.strip().splitlines()[-1] == "7 of 7 nodes in int8; MACs in int8: 599,680 of 599,680 (100.0%)"
    data = json.loads(invoke("inspect", target_bundle("jetson-orin").path, "--json").output)
    assert data["providers"][0] == "TensorrtExecutionProvider" and data["int8_mac_share"] == 1.0
    assert all(n["provider"] == "TensorrtExecutionProvider" for n in data["nodes"] if n["op_type"] == "Conv")
    bad = invoke("inspect", digits_bundle.path / "nope")
    assert bad.exit_code == 1 and "manifest.json is missing" in bad.output
