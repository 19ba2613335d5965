"""Target profiles: every built-in profile produces a bundle whose int8 graph obeys it; user profiles and
their errors; fixed input shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgequant
from edgequant.errors import TargetError
from edgequant.inspection import inspect_bundle

from conftest import DIGITS
from test_cli import assert_user_error, invoke

PROFILES = ["generic-cpu", "x86-avx2", "x86-vnni", "arm64", "rpi4", "rpi5", "rpi5-xnnpack", "jetson-orin",
            "android-nnapi"]


def qdq_facts(model: onnx.ModelProto):
    """The int8 graph's activation zero points, weight zero points/values and per-op weight scale sizes."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    acts = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    weights = {}  # consumer op name -> (op type, zero point, quantized values, scale)
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in producer:
            dq = producer[n.input[1]]
            weights[n.name] = (n.op_type, inits[dq.input[2]], inits[dq.input[0]], inits[dq.input[1]])
    return acts, weights


def test_builtin_profiles_are_listed_one_line_each():
    names = [t.name for t in edgequant.list_targets()]
    assert set(PROFILES) <= set(names)
    result = invoke("targets")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == len(names) and all(line.split()[0] in names for line in lines)
    assert any("Tensorrt>CUDA>CPU" in line for line in lines)


@pytest.mark.parametrize("name", PROFILES)
def test_bundle_obeys_its_profile(name, target_bundle):
    tgt = edgequant.load_target(name)
    q = tgt.quantization
    bundle = target_bundle(name)
    model = onnx.load(str(bundle.model_path))
    assert bundle.manifest["model"]["opset"] == tgt.opset
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == tgt.opset
    acts, weights = qdq_facts(model)
    assert acts and all(zp.dtype == np.dtype(q.activation_dtype) for zp in acts)
    if q.activation_symmetric:
        assert all(np.all(zp == 0) for zp in acts)
    assert len(weights) == 4  # three Conv, one Gemm
    for op, zp, values, scale in weights.values():
        assert values.dtype == np.dtype(q.weight_dtype)
        if q.weight_symmetric:
            assert np.all(zp == 0)
            bound = 64 if q.reduce_range else 127  # 7-bit, or narrow 8-bit range: -128 is never used
            assert -bound <= values.min() and values.max() <= bound
        per_channel = q.per_channel and op in q.per_channel_op_types
        assert (scale.size > 1) == per_channel, (op, scale.size)
    dims = [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input]
    if tgt.runtime.static_shapes:
        assert dims == [[1, 1, 8, 8]] and bundle.manifest["inputs"][0]["shape"] == [1, 1, 8, 8]
        assert bundle.manifest["outputs"][0]["shape"] == [1, 10]
    else:
        assert dims == [["batch", 1, 8, 8]]
    fid = bundle.report["fidelity"][0]
    assert fid["argmax_agreement"] >= 0.98 and fid["cosine"] >= 0.999
    # every multiply-accumulate runs in int8 on the profile's providers
    assert inspect_bundle(bundle).int8_mac_share == 1.0


def test_jetson_orin_is_symmetric_int8_everywhere(target_bundle):
    model = onnx.load(str(target_bundle("jetson-orin").model_path))
    zps = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert len(zps) >= 10
    assert all(np.all(zp == 0) for zp in zps)  # activations, weights and biases
    assert {zp.dtype for zp in zps} <= {np.dtype("int8"), np.dtype("int32")}


def test_android_nnapi_has_uint8_activations_and_per_channel_conv_only(target_bundle):
    model = onnx.load(str(target_bundle("android-nnapi").model_path))
    acts, weights = qdq_facts(model)
    assert {zp.dtype for zp in acts} == {np.dtype("uint8")}
    sizes = {op: scale.size for op, _, _, scale in weights.values()}
    assert sizes["Conv"] > 1 and sizes["Gemm"] == 1


def test_opset_asked_for_wins(tmp_path, digits_bundle):
    b = edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=tmp_path / "b", target="rpi5",
                         opset=16, num_samples=20, progress=False)
    assert b.manifest["model"]["opset"] == 16


def test_user_profile_file(tmp_path, digits_bundle):
    text = (DIGITS.parents[1] / "toolchains" / "rpi5.toml").read_text()
    board = tmp_path / "my-board.toml"
    board.write_text(text.replace('name = "rpi5"', 'name = "my-board"').replace("opset = 18", "opset = 17"))
    result = invoke("export", digits_bundle.fp32_model_path, "--calibrate", DIGITS / "data", "-o",
                    tmp_path / "out", "--target", board, "--num-samples", "20", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "target my-board" in result.output
    assert edgequant.load_bundle(tmp_path / "out").manifest["model"]["opset"] == 17


@pytest.mark.parametrize("edit, needle", [
    (('weight_symmetric = true', 'weight_symetric = true'), "unknown key quantization.'weight_symetric'"),
    (('per_channel = true', 'per_channel = "yes"'), "quantization.per_channel must be bool"),
    (('kernels = "ort-cpu"', 'kernels = "magic"'), "runtime.providers[1].kernels must be one of"),
    (('dtypes = ["int8/int8", "uint8/uint8"]', 'dtypes = ["int8-int8"]'),
     "runtime.providers[0].dtypes entry 'int8-int8' must be ACTIVATION/WEIGHT"),
    (('symmetric_weights = true', 'symmetric_weights = true\nfp8 = true'), "unknown key runtime.providers[0].'fp8'"),
    (('activation_dtype = "int8"', 'activation_dtype = "uint8"'),
     "quantization.activation_dtype/weight_dtype uint8/int8 is refused by XnnpackExecutionProvider"),
    (('per_channel_op_types = ["Conv"]\nreduce', 'per_channel_op_types = ["Conv", "Gemm"]\nreduce'),
     "quantization.per_channel_op_types lists Gemm"),
    (('weight_symmetric = true', "weight_symmetric = true\nuint8_weight_nodes = ['dense(']"),
     "uint8_weight_nodes entry 'dense(' is not a regular expression"),
])
def test_malformed_profile_is_one_line_naming_the_key(tmp_path, edit, needle):
    text = (DIGITS.parents[1] / "toolchains" / "rpi5-xnnpack.toml").read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(TargetError, match=None) as info:
        edgequant.load_target(bad)
    assert needle in str(info.value)
    assert_user_error(invoke("export", "m.onnx", "--calibrate", tmp_path, "-o", tmp_path / "o", "--target", bad),
                      needle)


def test_static_shape_profile_needs_static_shapes(tmp_path):
    text = (DIGITS.parents[1] / "toolchains" / "android-nnapi.toml").read_text()
    bad = tmp_path / "nnapi-dynamic.toml"
    bad.write_text(text.replace("static_shapes = true\n", "static_shapes = false\n", 1))
    with pytest.raises(TargetError, match="runtime.static_shapes must be true: NnapiExecutionProvider"):
        edgequant.load_target(bad)


def test_input_shape_option_fixes_shapes(tmp_path, digits_bundle):
    result = invoke("export", digits_bundle.fp32_model_path, "--calibrate", DIGITS / "data", "-o", tmp_path / "b",
                    "--input-shape", "x:4,1,8,8", "--num-samples", "20", "--no-progress")
    assert result.exit_code == 0, result.output
    m = edgequant.load_bundle(tmp_path / "b").manifest
    assert m["inputs"][0]["shape"] == [4, 1, 8, 8] and m["outputs"][0]["shape"] == [4, 10]
    assert (m["selftest"]["samples"], m["selftest"]["entries"]) == (16, 4)  # golden batches of the fixed 4
    from edgequant._runtime.edgequant_runtime import Session

    result = Session(tmp_path / "b").selftest()
    assert result.passed and result.samples == 16 and result.argmax_agreement == 1.0
    assert_user_error(invoke("export", digits_bundle.fp32_model_path, "--calibrate", DIGITS / "data", "-o",
                             tmp_path / "c", "--input-shape", "1x3x8x8"), "input 'x': fixed shape [1, 3, 8, 8]")
    assert_user_error(invoke("export", digits_bundle.fp32_model_path, "--calibrate", DIGITS / "data", "-o",
                             tmp_path / "d", "--input-shape", "y:1,1,8,8"), "names y, which the model does not have")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
