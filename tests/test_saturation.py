"""The per-channel weight range rule for CPUs whose u8·s8 kernels add pairs of products in saturating int16
(x86 AVX2): it keeps 8 bits where pair sums cannot leave int16 and narrows where they would."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgequant
from edgequant.errors import TargetError
from edgequant.quantize.saturation import INT16_MAX, pair_matrix, pair_overflows, safe_levels
from edgequant.targets import QuantSpec, load_target

from conftest import DIGITS


def _conv(w: np.ndarray, group: int = 1) -> onnx.NodeProto:
    return helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group)


def test_pairs_follow_kernel_row_column_channel_order():
    w = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)  # Cout 2, Cin 3, 2x2 kernel
    m = pair_matrix(_conv(w), w)
    assert m.shape == (2, 12)
    assert list(m[0, :3]) == [w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0]]  # channels vary fastest
    assert pair_matrix(_conv(w, 3), np.ones((3, 1, 3, 3))) is None  # depthwise never saturates


def test_full_range_kept_where_signs_alternate_and_narrowed_where_they_agree():
    rng = np.random.default_rng(0)
    mag = rng.uniform(0.5, 1.0, size=(4, 64))
    alternating = mag * np.where(np.arange(64) % 2, -1.0, 1.0)  # every pair (0,1), (2,3)... has mixed signs
    agreeing = mag.copy()                                         # every pair shares its sign
    assert (safe_levels(alternating) == 127).all()
    levels = safe_levels(agreeing)
    assert (levels < 127).all() and (levels >= 64).all()
    q = np.round(agreeing / (np.abs(agreeing).max(1, keepdims=True) / levels[:, None]))
    assert ((q[:, 0::2] + q[:, 1::2]).max(1) * 255 <= INT16_MAX).all()  # provably within int16


def test_measured_activations_allow_full_range_only_when_they_stay_small():
    w = np.full((2, 8), 1.0)  # same-sign pairs of 127: 254·255 overflows if both activations reach 255
    small = (np.full(4, 100.0), np.full(4, 100.0))  # a0, a1 ≤ 100: 254·100 fits
    large = (np.full(4, 255.0), np.full(4, 255.0))  # both can reach 255
    skewed = (np.full(4, 255.0), np.full(4, 2.0))   # 127·255 + 127·2 fits
    assert (safe_levels(w, small) == 127).all()
    assert (safe_levels(w, large) == 64).all()
    assert (safe_levels(w, skewed) == 127).all()


def test_profile_refuses_pair_saturation_with_reduce_range():
    with pytest.raises(TargetError, match="reduce_range"):
        QuantSpec(reduce_range=True, pair_saturation=True)


@pytest.fixture(scope="module")
def digits_fp32(digits_bundle):
    return onnx.load(str(digits_bundle.fp32_model_path))


def test_digits_bundle_is_safe_on_avx2_and_keeps_8_bits(digits_bundle, digits_split):
    """The default (generic-cpu) digits bundle: no pair sum leaves int16 on held-out digits, so an AVX2 CPU
    computes what the report promises; nearly all channels still have wider than 7-bit weights."""
    model = onnx.load(str(digits_bundle.model_path))
    name = model.graph.input[0].name
    samples = [{name: x} for x in digits_split[2][:200]]
    assert pair_overflows(model, samples) == {}
    levels = [np.abs(numpy_helper.to_array(i)).reshape(i.dims[0], -1).max(1) for i in model.graph.initializer
              if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    full = np.concatenate(levels)
    assert (full > 64).mean() >= 0.9 and np.median(full) >= 100, np.percentile(full, [10, 50, 90])  # past 7 bits
    assert digits_bundle.report["fidelity"][0]["argmax_agreement"] >= 0.98


def test_full_range_weights_would_overflow_on_digits(digits_fp32, digits_split, tmp_path):
    """The same model with plain 8-bit weights overflows int16 pair sums: the check above can fail."""
    from dataclasses import replace

    name = digits_fp32.graph.input[0].name
    samples = [{name: x} for x in digits_split[2][:200]]
    tgt = load_target("generic-cpu")
    plain = replace(tgt, quantization=replace(tgt.quantization, pair_saturation=False))
    bundle = edgequant.export(digits_fp32, DIGITS / "data", out=tmp_path / "b", target=plain, progress=False,
                              layer_report=False)
    assert pair_overflows(onnx.load(str(bundle.model_path)), samples)
