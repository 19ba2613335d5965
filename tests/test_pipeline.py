"""The main job end to end on the digits example: accuracy, int8 kernels, report, determinism."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import onnx

import edgequant
from edgequant.check.fidelity import cpu_kernels

from conftest import DIGITS, ROOT, residual_block, run_onnx


def test_digits_int8_accuracy_within_half_a_point(digits_bundle, digits_split):
    _, _, x_test, y_test = digits_split
    fp32 = np.mean(np.argmax(run_onnx(digits_bundle.fp32_model_path, x_test), 1) == y_test) * 100
    int8 = np.mean(np.argmax(run_onnx(digits_bundle.model_path, x_test), 1) == y_test) * 100
    assert fp32 >= 95.0, fp32
    assert fp32 - int8 <= 0.5, (fp32, int8)


def test_every_conv_and_gemm_runs_in_int8(digits_bundle):
    fp32 = onnx.load(str(digits_bundle.fp32_model_path))
    macs = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in fp32.graph.node)
    kernels = cpu_kernels(onnx.load(str(digits_bundle.model_path)))
    assert kernels.float_compute == []
    int8_macs = sum(kernels.int8.get(op, 0) for op in ("QLinearConv", "QGemm", "QLinearMatMul"))
    assert macs == 4 and int8_macs == macs


def test_report_holds_fidelity_sizes_and_kernels(digits_bundle):
    report = json.loads((digits_bundle.path / "report.json").read_text())
    (fid,) = report["fidelity"]
    assert fid["argmax_agreement"] >= 0.98
    # README's quick start prints this bundle's figures: they must be the ones it gets, to the printed digit
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cosine = float(re.search(r"output   linear: cosine (\d\.\d{5}) ", readme).group(1))
    nodes = int(re.search(r"int8     (\d+) nodes run in int8", readme).group(1))
    assert fid["cosine"] == pytest.approx(cosine, abs=5e-6), (fid["cosine"], cosine)
    assert report["kernels"]["int8_nodes"] == nodes == 5
    assert fid["samples"] == 60  # every 5th of the 300 samples is held out
    assert report["holdout"]["disjoint_from_calibration"] is True
    assert report["calibration"]["samples"] == 240
    assert report["sizes"]["int8_bytes"] < 0.5 * report["sizes"]["fp32_bytes"]
    # README: "5 nodes run in int8 on the CPU provider: QGemm 1, QLinearConv 3, QLinearGlobalAveragePool 1"
    assert report["kernels"]["int8"] == {"QGemm": 1, "QLinearConv": 3, "QLinearGlobalAveragePool": 1}


def test_manifest_describes_inputs_and_checksums(digits_bundle):
    m = digits_bundle.manifest
    assert m["schema_version"] == 1
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert m["quantization"]["activation_dtype"] == "uint8" and m["quantization"]["per_channel"] is True
    assert set(m["files"]) == {"model.onnx", "model.fp32.onnx", "edgequant_runtime.py", "layers.png", "report.html",
                            "golden.npz"}
    edgequant.load_bundle(digits_bundle.path)  # checksums verify


def test_build_is_deterministic(digits_bundle, tmp_path):
    # another process (another hash seed) and another checkout location give the same bytes
    import os
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "digits"
    shutil.copytree(DIGITS, copy)
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-m", "edgequant.cli", "export", f"{copy / 'model.py'}:build", "--calibrate",
                    str(copy / "data"), "-o", str(tmp_path / "again"), "--no-progress"], check=True, env=env,
                   capture_output=True)
    assert (tmp_path / "again" / "model.onnx").read_bytes() == digits_bundle.model_path.read_bytes()
    m = onnx.load(str(digits_bundle.model_path))
    assert str(DIGITS) not in str(m)  # no build-machine paths inside the deployed model


def test_dynamic_batch_axis(digits_bundle, digits_split):
    _, _, x_test, _ = digits_split
    one = run_onnx(digits_bundle.model_path, x_test[:1])
    many = run_onnx(digits_bundle.model_path, x_test[:7])
    assert many.shape == (7, 10)
    np.testing.assert_allclose(one[0], many[0], rtol=0, atol=1e-5)


def test_residual_network_fuses_every_conv_add_and_pool(tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), residual_block(16),
                          residual_block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((3, 32, 32)).astype(np.float32) for _ in range(20)]
    bundle = edgequant.export(model, data, out=tmp_path / "res", progress=False)
    kernels = bundle.report["kernels"]
    assert kernels["float_compute"] == []
    assert kernels["int8"]["QLinearConv"] == 5 and kernels["int8"]["QLinearAdd"] == 2
    assert kernels["int8"]["QGemm"] == 1 and kernels["int8"].get("QLinearGlobalAveragePool", 0) == 1
    assert bundle.report["fidelity"][0]["cosine"] > 0.99
