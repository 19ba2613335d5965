"""Detection heads: a YOLO-style output (decoded boxes + scores in one Concat, DFL decode) keeps its decode
tail float, so the scores survive; detection agreement through the device's reference NMS."""

from __future__ import annotations

import numpy as np
import pytest


def _tiny_yolo():
    """A YOLOv8-shaped head on a 2-conv backbone: DFL box branch (4×8 bins) + 3 class scores, one stride."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.SiLU())
            self.box = nn.Conv2d(16, 32, 1)
            self.cls = nn.Conv2d(16, 3, 1)
            self.dfl = nn.Conv2d(8, 1, 1, bias=False)
            self.dfl.weight.data[:] = torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1)
            self.dfl.weight.requires_grad_(False)
            ys, xs = torch.meshgrid(torch.arange(8) + 0.5, torch.arange(8) + 0.5, indexing="ij")
            self.register_buffer("anchors", torch.stack([xs.flatten(), ys.flatten()]).unsqueeze(0))  # 1,2,64

        def forward(self, x):
            f = self.body(x)
            b = self.box(f).view(-1, 4, 8, 64).transpose(2, 1).softmax(1)
            d = self.dfl(b).view(-1, 4, 64)
            lt, rb = d.chunk(2, 1)
            x1y1, x2y2 = self.anchors - lt, self.anchors + rb
            box = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * 4.0
            return torch.cat((box, self.cls(f).view(-1, 3, 64).sigmoid()), 1)

    return Head().eval()


@pytest.fixture(scope="module")
def yolo_bundle(tmp_path_factory):
    import edgequant

    x = np.random.default_rng(0).uniform(0, 1, (40, 3, 32, 32)).astype(np.float32)
    return edgequant.export(_tiny_yolo(), x, out=tmp_path_factory.mktemp("yolo") / "b", progress=False)


def test_yolo_head_keeps_its_decode_tail_float_and_the_scores_survive(yolo_bundle):
    r = yolo_bundle.report
    (head,) = r["heads"]
    assert head["pattern"] == "decode-tail+dfl" and head["parts"] == [[0, 4], [4, 7]]
    assert any("softmax" in n for n in head["float_nodes"]) and any("sigmoid" in n for n in head["float_nodes"])
    boxes, scores = r["fidelity"][0]["parts"]
    assert scores["index"] == "4:7" and scores["sqnr_db"] > 25 and boxes["sqnr_db"] > 25
    assert r["fidelity_gate"]["passed"]
    # the learned convolutions still run int8
    assert r["kernels"]["int8"].get("QLinearConv", 0) >= 4


def test_detection_agreement_in_the_report_and_the_bundle_carries_the_nms(yolo_bundle):
    det = yolo_bundle.report["detection"]
    assert det["status"] == "ok" and det["fp32_detections"] > 20 and det["agreement"] >= 0.9
    assert "edgequant_detect.py" in yolo_bundle.manifest["files"]


def test_reference_nms_and_match():
    from edgequant._runtime.edgequant_detect import decode, match

    out = np.zeros((6, 4), np.float32)  # 2 classes, 4 anchors
    out[:4, 0], out[:4, 1], out[:4, 2], out[:4, 3] = (10, 10, 8, 8), (11, 10, 8, 8), (50, 50, 8, 8), (10, 10, 8, 8)
    out[4] = (0.9, 0.8, 0.0, 0.1)
    out[5] = (0.0, 0.0, 0.7, 0.0)
    d = decode(out, conf=0.25, iou=0.45)
    assert d.classes.tolist() == [0, 1] and d.scores.tolist() == pytest.approx([0.9, 0.7])  # anchor 1 suppressed
    assert match(d, d) == 2 and match(d, d._replace(classes=d.classes[::-1])) == 0
    with pytest.raises(ValueError):
        decode(np.full((6, 4), np.nan, np.float32))


def test_an_unrecognised_mixed_head_keeps_only_its_concat_float_and_names_it():
    """No learned layer between the graph input and the mixed-range Concat: not a pattern known here."""
    import onnx
    from onnx import TensorProto, helper

    from edgequant.quantize.heads import mixed_range_heads

    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["big"], name="scale"),
         helper.make_node("Sigmoid", ["x"], ["small"], name="sig"),
         helper.make_node("Concat", ["big", "small"], ["y"], name="cat", axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [500.0])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (plan,) = mixed_range_heads(model, {"big": (-500.0, 500.0), "small": (0.0, 1.0), "x": (-1.0, 1.0)})
    assert plan.pattern == "unrecognised" and plan.float_nodes == ["cat"] and plan.parts == [(0, 4), (4, 8)]
    assert mixed_range_heads(model, {"big": (-5.0, 5.0), "small": (0.0, 1.0)}) == []  # one decade: one range
