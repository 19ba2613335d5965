"""Per-layer error: the table in the report is real (finite, sensible, consistent with the output fidelity) and
puts a deliberately broken layer at the top of the "alone" ranking without blaming the layers after it."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgequant.data.holdout import split_holdout
from edgequant.calibration.streaming import calibrate, tensors_to_calibrate
from edgequant.cli import cli
from edgequant.data.samples import load_samples
from edgequant.check.layers import format_layers, layer_errors
from edgequant.quantize.qdq import quantize
from edgequant.targets import load_target

from conftest import DIGITS


@pytest.fixture(scope="module")
def digits_parts(digits_bundle):
    fp32 = onnx.load(str(digits_bundle.fp32_model_path))
    int8 = onnx.load(str(digits_bundle.model_path))
    calib, holdout = split_holdout(load_samples(DIGITS / "data").bind(["x"]), None)
    return fp32, int8, calib, holdout


def test_layer_table_is_real(digits_bundle, digits_parts):
    rows = digits_bundle.report["layers"]
    _, int8, _, holdout = digits_parts
    activation_qs = [n for n in int8.graph.node if n.op_type == "QuantizeLinear"]
    assert len(rows) == len(activation_qs) == 8  # x, 3 conv outputs, pool, gap, reshape, logits
    alone = [r["alone_sqnr_db"] for r in rows]
    assert alone == sorted(alone)  # worst first
    for r in rows:
        # 8-bit activations give ~25-55 dB on a well-calibrated model; error grows along the graph, so the
        # accumulated figure is never much better than the layer's own one
        assert 20.0 < r["alone_sqnr_db"] < 60.0 and 20.0 < r["accumulated_sqnr_db"] < 60.0, r
        assert r["accumulated_sqnr_db"] <= r["alone_sqnr_db"] + 0.5, r
        assert math.isclose(r["accumulated_mse"], r["fp32_rms"] ** 2 * 10 ** (-r["accumulated_sqnr_db"] / 10),
                            rel_tol=1e-3)
    by_tensor = {r["tensor"]: r for r in rows}
    assert by_tensor["x"]["node"] == "" and by_tensor["x"]["alone_sqnr_db"] == by_tensor["x"]["accumulated_sqnr_db"]
    convs = [r for r in rows if r["op_type"] == "Conv"]
    assert [r["module"] for r in sorted(convs, key=lambda r: r["index"])] == ["features.1", "features.4",
                                                                              "features.8"]
    assert by_tensor["linear"]["module"] == "classifier"

    # accumulated error at the output = what the deployed int8 model does (same fused kernels)
    fid = digits_bundle.report["fidelity"][0]
    out = by_tensor[fid["output"]]
    # the table runs on the first MAX_SAMPLES held-out samples
    from edgequant.check.layers import MAX_SAMPLES

    x = np.stack([holdout[i]["x"] for i in range(min(len(holdout), MAX_SAMPLES))])
    ref = ort.InferenceSession(str(digits_bundle.fp32_model_path)).run(None, {"x": x})[0].astype(np.float64)
    q = ort.InferenceSession(str(digits_bundle.model_path)).run(None, {"x": x})[0].astype(np.float64)
    assert out["accumulated_max_abs_error"] == pytest.approx(np.abs(ref - q).max(), rel=1e-4)
    assert out["accumulated_max_abs_error"] <= fid["max_abs_error"] * (1 + 1e-6)
    assert out["accumulated_mse"] == pytest.approx(np.mean((ref - q) ** 2), rel=1e-4)


def test_a_broken_range_tops_the_alone_ranking(digits_parts):
    fp32, _, calib, holdout = digits_parts
    target = load_target("generic-cpu")
    ranges = calibrate(fp32, calib, tensors_to_calibrate(fp32, target.quantization.op_types))
    clean = {r.tensor: r for r in layer_errors(fp32, quantize(fp32, ranges, target), holdout)}
    assert min(clean.values(), key=lambda r: r.alone_sqnr_db).tensor != "relu"

    lo, hi = ranges["relu"]
    broken = dict(ranges, relu=(lo, hi / 20))  # first block's output clipped at 5% of its range
    int8 = quantize(fp32, broken, target)
    before = fp32.SerializeToString(), int8.SerializeToString()
    rows = layer_errors(fp32, int8, holdout)
    assert (fp32.SerializeToString(), int8.SerializeToString()) == before  # the caller's models are untouched
    assert rows[0].tensor == "relu" and rows[0].module == "features.1"
    assert rows[0].alone_sqnr_db < clean["relu"].alone_sqnr_db - 15.0
    assert rows[0].alone_sqnr_db < rows[1].alone_sqnr_db - 10.0
    for r in rows[1:]:  # downstream layers are not blamed for the clipped input they receive
        assert abs(r.alone_sqnr_db - clean[r.tensor].alone_sqnr_db) < 3.0, r
    # ...but the accumulated error after it shows the damage
    assert next(r for r in rows if r.tensor == "relu_1").accumulated_sqnr_db < clean["relu_1"].accumulated_sqnr_db - 10


def test_a_float_model_has_no_rows(digits_parts):
    fp32, _, _, holdout = digits_parts
    assert layer_errors(fp32, fp32, holdout) == []


def test_inspect_layers_prints_the_table(digits_bundle):
    result = CliRunner().invoke(cli, ["inspect", str(digits_bundle.path), "--layers"])
    assert result.exit_code == 0, result.output
    worst = digits_bundle.report["layers"][0]
    table = result.output.split("alone dB")[1].splitlines()[2]
    assert worst["tensor"] in table and f"{worst['alone_sqnr_db']:.2f}" in table
    assert "QLinearConv" in result.output
    assert format_layers([]) == "layers   no quantized activations"


def test_inspect_refuses_what_is_not_a_bundle(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--layers"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {tmp_path} is not an edgequant bundle: manifest.json "
                                                  "is missing"]


def test_a_graph_the_analysis_refuses_costs_a_warning_not_the_bundle(digits_parts, monkeypatch, caplog):
    import edgequant.check.layers
    from edgequant.config import ExportConfig
    from edgequant.jobs import ptq
    from edgequant.jobs.stages import Run
    from edgequant.targets import load_target

    fp32, int8, _, holdout = digits_parts

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Node (n) Op (If) subgraph")

    monkeypatch.setattr(edgequant.check.layers, "layer_errors", refuse)
    run = Run(ExportConfig.from_options(None, None, out="unused", progress=False), load_target("generic-cpu"), 18,
              work=fp32, int8=int8, holdout=holdout)
    ptq.layers(run)  # the stage alone, on a hand-made run
    assert "layers" not in run.parts
    assert "per-layer error report skipped: RuntimeError" in caplog.text


def test_inspect_layers_of_a_bundle_without_the_table(digits_bundle, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(digits_bundle.path, old)
    report = json.loads((old / "report.json").read_text())
    del report["layers"]
    (old / "report.json").write_text(json.dumps(report))
    result = CliRunner().invoke(cli, ["inspect", str(old), "--layers"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: {old}: report.json has no per-layer table; export "
                                                  "the bundle again with this edgequant to get one"]


def _se_block():
    """A MobileNetV3-like block: stem with hard-swish, depthwise conv, squeeze-excitation with a hard-sigmoid
    gate, classifier. On generic-cpu both HardSigmoids (the gate and hard-swish's) run as an int8 Add."""
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1)
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc2(torch.relu(self.fc1(self.pool(x)))))

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish(),
                         nn.Conv2d(16, 16, 3, 1, 1, groups=16), SE(16), nn.Conv2d(16, 24, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()


def test_a_hardsigmoid_run_as_an_int8_add_is_read_in_its_consumers_scale(tmp_path):
    """The Add quantizes x + β/α at (1/α)/255 and its consumers read the codes at 1/255: read at the
    QuantizeLinear's own scale the row said -14.0 dB; read as its consumers read it, the layer is as good as
    its neighbours (52 dB measured)."""
    import edgequant

    x = np.random.default_rng(0).standard_normal((48, 3, 32, 32)).astype(np.float32)
    b = edgequant.export(_se_block(), x, out=tmp_path / "b", progress=False, layer_report=True)
    assert b.report["algorithms"]["int8_hardsigmoid"] == 2
    adds = [r for r in b.report["layers"] if r["node"].endswith("_as_add")]
    assert len(adds) == 2
    for r in adds:
        assert r["alone_sqnr_db"] > 30.0 and r["accumulated_sqnr_db"] > 30.0, r
    assert b.report["layers"][0]["alone_sqnr_db"] > 30.0  # no layer of this model is blamed
    assert b.report["fidelity"][0]["sqnr_db"] > 30.0
