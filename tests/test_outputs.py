"""Per-output and per-part agreement, degenerate outputs, and the gate that refuses a grossly wrong int8 model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgequant.check.fidelity import compare_outputs
from edgequant.check.outputs import OutputAgreement, gross_failures


def _yolo_like(seed=0):
    """(N, 84, 100): 4 box rows up to ~600 and 80 score rows in 0–1, as a YOLOv8 head concatenates them."""
    rng = np.random.default_rng(seed)
    boxes = rng.uniform(0, 600, (6, 4, 100))
    scores = rng.beta(0.5, 4.0, (6, 80, 100))
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def test_a_destroyed_score_part_shows_although_the_cosine_looks_perfect():
    ref = _yolo_like()
    test = ref.copy()
    test[:, :4] += np.random.default_rng(1).normal(0, 1.0, test[:, :4].shape)
    test[:, 4:] = 0.0  # one scale of ~2.4 per step: every score rounds to zero
    r = compare_outputs("output0", ref, test).to_dict()
    assert r["cosine"] > 0.999  # the single summary number hides it
    boxes, scores = r["parts"]
    assert (boxes["axis"], boxes["index"], scores["index"]) == (1, "0:4", "4:84")
    assert boxes["sqnr_db"] > 40 and scores["sqnr_db"] < 1 and scores["correlation"] == 0.0
    (what, why), = gross_failures([r])
    assert what == "output0[axis 1: 4:84]" and "SQNR" in why


def test_parts_are_folded_batch_by_batch_like_one_pass():
    ref = _yolo_like()
    test = ref + np.float32(0.01)
    acc = OutputAgreement("o")
    for i in range(0, 6, 2):
        acc.update(ref[i:i + 2], test[i:i + 2])
    one = compare_outputs("o", ref, test).to_dict()
    assert acc.result()["parts"] == one["parts"] and acc.result()["cosine"] == one["cosine"]


def test_a_one_range_output_has_no_parts_and_passes():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (20, 10)).astype(np.float32)
    r = compare_outputs("logits", ref, ref + rng.normal(0, 0.05, ref.shape).astype(np.float32)).to_dict()
    assert "parts" not in r and r["sqnr_db"] > 30 and gross_failures([r]) == []


def test_degenerate_outputs_are_named_never_cosine_one():
    zeros = np.zeros((4, 10), np.float32)
    r = compare_outputs("z", zeros, zeros).to_dict()
    assert r["status"] == "zero" and r["cosine"] is None and "cannot be checked" in r["note"]
    const = np.full((4, 10), 3.0, np.float32)
    assert compare_outputs("c", const, const).to_dict()["status"] == "constant"
    labels = np.array([[1, 2], [3, 4]], np.int64)
    r = compare_outputs("ids", labels, np.array([[1, 2], [3, 5]], np.int64)).to_dict()
    assert r["status"] == "integer" and r["cosine"] is None and r["exact_match"] == 0.75


def test_an_all_zero_int8_output_is_cosine_zero_and_fails():
    ref = np.random.default_rng(0).normal(0, 1, (8, 10)).astype(np.float32)
    r = compare_outputs("logits", ref, np.zeros_like(ref)).to_dict()
    assert r["cosine"] == 0.0 and r["status"] == "ok"
    assert gross_failures([r])[0][0] == "logits"


class _SkewedHead:
    """A small MLP whose last layer writes one channel ~1000× larger than the other nine: one per-tensor scale
    rounds those nine to a single value."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
        with torch.no_grad():
            model[2].weight[0] *= 300.0
            model[2].weight[1:] *= 0.003
            model[2].bias.zero_()
        return model.eval()


def test_grossly_wrong_int8_fails_in_one_line_and_writes_nothing(tmp_path):
    import edgequant
    from edgequant.errors import FidelityError

    data = np.random.default_rng(0).normal(0, 1, (60, 8)).astype(np.float32)
    out = tmp_path / "bundle"
    with pytest.raises(FidelityError) as info:
        edgequant.export(_SkewedHead.build(), data, out=out, progress=False, layer_report=False)
    msg = str(info.value)
    assert "\n" not in msg and not out.exists()
    assert "[axis 1: 1:10]" in msg and "worst layer" in msg and "--allow-inaccurate" in msg
    node = re.search(r"--exclude (\S+?)\)", msg).group(1)
    # the fix it names works
    fixed = edgequant.export(_SkewedHead.build(), data, out=out, progress=False, exclude_nodes=[node],
                             layer_report=False)
    assert fixed.report["fidelity_gate"]["passed"]
    forced = edgequant.export(_SkewedHead.build(), data, out=tmp_path / "forced", progress=False,
                              layer_report=False, allow_inaccurate=True)
    gate = forced.report["fidelity_gate"]
    assert not gate["passed"] and gate["overridden"] and "1:10" in gate["failures"][0]


def test_segmentation_logits_report_per_pixel_argmax_agreement():
    """(N, C, H, W) logits: the class of each pixel is the argmax over C; the report counts matching pixels."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 5, 8, 8)).astype(np.float32)
    test = ref.copy()
    test[0, :, :2, :] = test[0, ::-1, :2, :]  # 16 pixels of sample 0 take another class order
    changed = int(np.sum(np.argmax(ref[0, :, :2], 0) != np.argmax(test[0, :, :2], 0)))
    acc = OutputAgreement("seg")
    acc.update(ref[:2], test[:2])
    acc.update(ref[2:], test[2:])
    r = acc.result()
    assert changed > 0
    assert r["pixel_argmax_agreement"] == pytest.approx(1 - changed / (3 * 64), abs=1e-6)
    assert r["argmax_agreement"] is None  # not a (N, classes) output
