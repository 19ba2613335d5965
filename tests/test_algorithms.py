"""Algorithms beyond min/max on the depthwise-separable digits model: cross-layer equalization keeps the fp32
function and, like bias correction, lowers the int8 error where weights are quantized per tensor."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgequant
from edgequant.transforms.algorithms import Algorithms, equalize_cross_layer
from edgequant.check.budget import sqnr_db
from edgequant.errors import CalibrationError
from edgequant.check.fidelity import session

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "digits" / "data"
DW = f"{ROOT / 'examples' / 'digits_dw' / 'model.py'}:build"


@pytest.fixture(scope="module")
def per_tensor():
    """The generic CPU profile with per-tensor 7-bit weights (as XNNPACK's u8 kernels need per-tensor)."""
    t = edgequant.load_target("generic-cpu")
    q = dataclasses.replace(t.quantization, per_channel=False, reduce_range=True, pair_saturation=False)
    return dataclasses.replace(t, name="per-tensor", quantization=q)


def _test_sqnr(bundle, x_test) -> float:
    ref = session(onnx.load(str(bundle.fp32_model_path))).run(None, {"x": x_test})[0]
    got = session(onnx.load(str(bundle.model_path))).run(None, {"x": x_test})[0]
    return sqnr_db({"y": ref}, {"y": got})


@pytest.fixture(scope="module")
def dw_runs(tmp_path_factory, per_tensor, digits_split):
    """Test-split SQNR (dB) of digits_dw with per-tensor weights: min/max, + equalization, + bias correction."""
    tmp = tmp_path_factory.mktemp("algos")
    x_test = digits_split[2]
    runs = {}
    for name, algo in (("minmax", Algorithms()), ("equalize", Algorithms(equalize=True)),
                       ("bias", Algorithms(bias_correction=True))):
        b = edgequant.export(DW, DATA, out=tmp / name, target=per_tensor, algorithms=algo, progress=False)
        runs[name] = (b, _test_sqnr(b, x_test))
    return runs


def test_equalization_keeps_the_fp32_function(dw_runs, digits_split):
    fp32 = onnx.load(str(dw_runs["minmax"][0].fp32_model_path))
    before = fp32.SerializeToString()
    eq, pairs = equalize_cross_layer(fp32)
    assert fp32.SerializeToString() == before  # the caller's model is untouched
    assert pairs == 8  # stem→dw, then dw→pw and pw→dw through the four blocks
    x = digits_split[2]
    ref, got = session(fp32).run(None, {"x": x})[0], session(eq).run(None, {"x": x})[0]
    assert np.abs(ref - got).max() < 1e-4 * np.abs(ref).max()
    # each depthwise conv's per-channel weight ranges are far closer together than before
    def spread(model, name):
        w = next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)
        r = np.abs(w.reshape(w.shape[0], -1)).max(1)
        return r.max() / r.min()
    assert spread(eq, "features.2.0.0.weight") < spread(fp32, "features.2.0.0.weight") / 2


def test_equalization_refuses_pairs_it_cannot_keep_exact(digits_bundle):
    # digits CNN: conv1 → ReLU → conv2 pairs; conv2 → ReLU → MaxPool → conv3 does not (MaxPool in between)
    fp32 = onnx.load(str(digits_bundle.fp32_model_path))
    assert equalize_cross_layer(fp32)[1] == 1


def test_equalization_helps_per_tensor_weights(dw_runs):
    assert dw_runs["equalize"][1] > dw_runs["minmax"][1] + 2.0
    assert dw_runs["equalize"][0].report["algorithms"]["equalized_pairs"] == 8


def test_bias_correction_helps_per_tensor_weights(dw_runs):
    assert dw_runs["bias"][1] > dw_runs["minmax"][1] + 1.5


def test_bad_algorithm_settings():
    with pytest.raises(CalibrationError, match="smooth_quant_alpha must be between 0 and 1"):
        Algorithms(smooth_quant_alpha=1.5)
