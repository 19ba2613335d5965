"""Per-output and per-part agreement, degenerate outputs, and the gate that refuses a grossly wrong int8 model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgequant.check.fidelity import compare_outputs
from edgequant.check.layout import ConcatPieces
from edgequant.check.outputs import OutputAgreement, gross_failures

# what check/layout.py reads from a YOLOv8 head's graph: axis 1 is Concat(boxes (4 rows), scores (80 rows))
YOLO_PIECES = ConcatPieces(1, ((0, 4), (4, 84)), ("cat",), (("boxes",), ("scores",)))


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
    r = compare_outputs("output0", ref, test, pieces=YOLO_PIECES).to_dict()
    assert r["cosine"] > 0.999  # the single summary number hides it
    boxes, scores = r["parts"]
    assert (boxes["axis"], boxes["index"], scores["index"]) == (1, "0:4", "4:84")
    assert boxes["sqnr_db"] > 40 and scores["sqnr_db"] < 1 and scores["correlation"] == 0.0
    (what, why), = gross_failures([r])
    assert what == "output0[axis 1: 4:84]" and "SQNR" in why
    # the same values without a Concat in the graph are one output: never cut by their value ranges
    assert "parts" not in compare_outputs("output0", ref, test).to_dict()


def test_pieces_of_one_range_are_one_part():
    ref = _yolo_like()
    ref[:, :4] /= 600.0  # boxes normalized to 0-1: the Concat joins pieces of one range
    r = compare_outputs("o", ref, ref + np.float32(0.01), pieces=YOLO_PIECES).to_dict()
    assert "parts" not in r


def test_parts_are_folded_batch_by_batch_like_one_pass():
    ref = _yolo_like()
    test = ref + np.float32(0.01)
    acc = OutputAgreement("o", pieces=YOLO_PIECES)
    for i in range(0, 6, 2):
        acc.update(ref[i:i + 2], test[i:i + 2])
    one = compare_outputs("o", ref, test, pieces=YOLO_PIECES).to_dict()
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
    """A small MLP whose last layer writes one channel ~1000× larger than the other nine, and returns them as
    Concat(channel 0, channels 1-9): the graph shows two branches of different ranges, and one per-tensor scale
    on the layer rounds the nine to a single value."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
                with torch.no_grad():
                    self.mlp[2].weight[0] *= 300.0
                    self.mlp[2].weight[1:] *= 0.003
                    self.mlp[2].bias.zero_()

            def forward(self, x):
                y = self.mlp(x)
                return torch.cat([y[:, :1], y[:, 1:]], 1)

        return Head().eval()


def test_grossly_wrong_int8_fails_in_one_line_with_advice_a_trial_backs(tmp_path):
    import edgequant
    from edgequant.errors import FidelityError

    data = np.random.default_rng(0).normal(0, 1, (60, 8)).astype(np.float32)
    out = tmp_path / "bundle"
    with pytest.raises(FidelityError) as info:
        edgequant.export(_SkewedHead.build(), data, out=out, progress=False, layer_report=False)
    msg = str(info.value)
    assert "\n" not in msg and not out.exists()
    assert "[axis 1: 1:10]" in msg and "a trial with it float passes the gate" in msg and "--allow-inaccurate" in msg
    node = re.search(r"--exclude (\S+?)\)", msg).group(1)
    # the fix it names works
    fixed = edgequant.export(_SkewedHead.build(), data, out=out, progress=False, exclude_nodes=[node],
                             layer_report=False)
    assert fixed.report["fidelity_gate"]["passed"]
    forced = edgequant.export(_SkewedHead.build(), data, out=tmp_path / "forced", progress=False,
                              layer_report=False, allow_inaccurate=True)
    gate = forced.report["fidelity_gate"]
    assert not gate["passed"] and gate["overridden"] and "1:10" in gate["failures"][0]


def test_advice_names_no_layer_that_a_trial_does_not_back():
    from edgequant.check.advice import advise

    failures = [("o[axis 1: 1:10]", "SQNR -3.0 dB, correlation 0.10 (floors 3 dB, 0.5)")]
    layers = [{"node": "gemm", "tensor": "y", "op_type": "Gemm", "alone_sqnr_db": 40.0}]
    model = _graph([("Gemm", ["x", "w"], ["y"], "gemm"), ("Identity", ["y"], ["o"], "id")])
    still_bad = [{"output": "o", "status": "ok", "sqnr_db": -3.0, "correlation": 0.1, "cosine": 0.2,
                  "argmax_agreement": None}]
    text = advise(failures, layers, model, lambda extra: still_bad)
    assert "Fix:" not in text and "'gemm'" in text and "does not fix it" in text and "--accuracy-budget" in text


def _graph(nodes):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node(op, i, o, name=n) for op, i, o, n in nodes], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.0] * 16)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


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


def _text_images(n, seed):
    """Dark images (32×64) with 1-2 bright "text lines" in the middle columns only, and their masks: the map's
    left and right margins are near zero on every image."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.2, (n, 3, 32, 64)).astype(np.float32)
    m = np.zeros((n, 1, 32, 64), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            r, c, h, w = rng.integers(2, 24), rng.integers(14, 28), rng.integers(4, 7), rng.integers(8, 20)
            x[i, :, r:r + h, c:c + w] += rng.uniform(0.5, 0.8)
            m[i, :, r:r + h, c:c + w] = 1
    return x, m


def _text_detector():
    """A DBNet-like text detector, built by hand: conv → conv (brightness at 1/4 scale) → 1-channel conv →
    upsample ×4 → sigmoid, a (N, 1, H, W) probability map ~1 on the text and ~1e-3 elsewhere (95% of pixels)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(),
                          nn.Conv2d(4, 1, 1), nn.Upsample(scale_factor=4, mode="bilinear"), nn.Sigmoid())
    with torch.no_grad():
        for conv, bias in ((model[0], -0.08), (model[2], 0.0)):
            w = torch.full_like(conv.weight, 1.0 / conv.weight[0].numel())
            conv.weight.copy_(w * (1 + 0.2 * torch.rand_like(w)))
            conv.bias.fill_(bias)
        model[4].weight.fill_(30.0 / 4)
        model[4].bias.fill_(-8.0)
    return model.eval()


def test_a_text_probability_map_is_scored_as_a_map_and_not_refused(tmp_path):
    """Cut into image rows by value range, the near-zero top rows scored 0.2 dB and the model was refused with
    advice naming a Sigmoid that is 48.3 dB alone; as a map: IoU 0.98 at p > 0.5, 39.9 dB, passed."""
    import edgequant

    x, _ = _text_images(48, 2)
    b = edgequant.export(_text_detector(), x, out=tmp_path / "b", progress=False, layer_report=False)
    (fid,) = b.report["fidelity"]
    assert fid["map"] == "probability" and fid["map_threshold"] == 0.5 and "parts" not in fid
    assert fid["map_iou"] > 0.95 and fid["sqnr_db"] > 30.0
    assert b.report["fidelity_gate"]["passed"]


def test_a_destroyed_probability_map_fails_by_its_iou():
    rng = np.random.default_rng(0)
    ref = (rng.uniform(0, 1, (4, 1, 16, 16)) > 0.8).astype(np.float32)
    test = np.roll(ref, 5, axis=3)  # the same amount of "text", in the wrong places
    r = compare_outputs("map", ref, test, dense=True).to_dict()
    assert r["map"] == "probability" and r["map_iou"] < 0.2
    (what, why), = gross_failures([r])
    assert what == "map" and why.startswith("map IoU")
    good = compare_outputs("map", ref, np.clip(ref + np.float32(0.45) * (ref == 0), 0, 1), dense=True).to_dict()
    assert good["map_iou"] == 1.0 and gross_failures([good]) == []  # a task-good map passes whatever its SQNR
    assert good["sqnr_db"] < 3.0


def _model(nodes, inputs, output, inits=()):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node(op, i, o, name=o[0], **attrs) for op, i, o, attrs in nodes], "g",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_the_concat_axis_is_followed_through_transpose_and_reshape():
    from onnx import helper

    from edgequant.check.layout import concat_pieces

    shape = helper.make_tensor("shape", 7, [3], [1, 7, 64])  # int64
    model = _model([("Concat", ["box", "cls"], ["cat"], {"axis": 1}),            # (1, 7, 8, 8)
                    ("Reshape", ["cat", "shape"], ["flat"], {}),                # (1, 7, 64)
                    ("Transpose", ["flat"], ["out"], {"perm": [0, 2, 1]})],     # (1, 64, 7)
                   [("box", [1, 4, 8, 8]), ("cls", [1, 3, 8, 8])], "out", [shape])
    (found,) = concat_pieces(model).values()
    assert (found.axis, found.pieces, found.concats) == (2, ((0, 4), (4, 7)), ("cat",))


def test_a_concat_along_image_rows_or_an_unfollowable_axis_gives_no_parts():
    from onnx import helper

    from edgequant.check.layout import concat_pieces, dense_map

    # a map joined along its height (tiles), then a Reshape that merges the rows with the columns
    shape = helper.make_tensor("shape", 7, [3], [1, 1, 256])
    tiles = _model([("Concat", ["top", "bottom"], ["map"], {"axis": 2}),
                    ("Reshape", ["map", "shape"], ["out"], {})],
                   [("top", [1, 1, 8, 16]), ("bottom", [1, 1, 8, 16])], "out", [shape])
    assert concat_pieces(tiles) == {}
    # a 4-D map over the input's pixels is dense; its rows are never parts even when a Concat built them
    rows = _model([("Concat", ["top", "bottom"], ["out"], {"axis": 2})],
                  [("top", [1, 1, 8, 16]), ("bottom", [1, 1, 8, 16])], "out")
    (found,) = concat_pieces(rows).values()
    assert found.axis == 2 and dense_map((1, 1, 16, 16), [(1, 3, 64, 64)])
    ref = np.concatenate([np.full((2, 1, 8, 16), 1e-3), np.ones((2, 1, 8, 16))], axis=2).astype(np.float32)
    ref[:, :, :8] *= np.random.default_rng(0).uniform(0.5, 1, (2, 1, 8, 16)).astype(np.float32)
    r = compare_outputs("out", ref, np.where(ref < 0.01, 0, ref).astype(np.float32), pieces=found, dense=True)
    assert not r.parts and r.map == "probability" and r.map_iou == 1.0
    assert not dense_map((1, 10), [(1, 3, 64, 64)]) and not dense_map((1, 8, 5, 7), [(1, 3, 64, 64)])


def test_detection_agreement_decides_for_a_detection_output():
    ref = _yolo_like()
    test = ref.copy()
    test[:, 4:] *= 0.2  # scores squeezed: the score part fails its SQNR floor
    r = compare_outputs("output0", ref, test, pieces=YOLO_PIECES).to_dict()
    assert [w for w, _ in gross_failures([r])] == ["output0[axis 1: 4:84]"]
    good = {"output": "output0", "status": "ok", "agreement": 0.95}
    assert gross_failures([r], good) == []  # good by its task metric: not refused
    (what, why), = gross_failures([r], dict(good, agreement=0.3))
    assert what == "output0" and why == "detection agreement 30.0% (floor 50%)"
    assert [w for w, _ in gross_failures([r], {"output": "output0", "status": "empty"})] == ["output0[axis 1: 4:84]"]


def test_an_output_that_hardly_varies_is_judged_by_its_sqnr():
    # a probability near 0.004 on every sample, int8 one step away: uncorrelated, yet 30 dB — not destroyed;
    # the same lack of correlation at 10 dB is
    from edgequant.check.outputs import gross_failures

    def result(sqnr, corr):
        return {"output": "p", "status": "ok", "sqnr_db": sqnr, "correlation": corr, "cosine": 0.99,
                "argmax_agreement": None}

    assert gross_failures([result(30.0, 0.0)]) == []
    assert [w for w, _ in gross_failures([result(10.0, 0.0)])] == ["p"]
    assert [w for w, _ in gross_failures([result(2.0, 0.9)])] == ["p"]
