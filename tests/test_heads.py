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


def _tiny_yolov5(nc=3, na=2):
    """A YOLOv5-shaped head on a small backbone: two detection levels (strides 4 and 8), ``na`` anchors per cell,
    each level's conv → sigmoid → split into xy, wh, (objectness + classes) → decoded → concatenated on the last
    axis, the levels joined along the anchor axis: (N, anchors, 4 + 1 + nc), as ultralytics v5 exports it."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.b1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.SiLU())
            self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.SiLU())
            self.m = nn.ModuleList(nn.Conv2d(16, na * (5 + nc), 1) for _ in range(2))
            self.strides = (4.0, 8.0)
            for i, n in enumerate((8, 4)):
                ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
                self.register_buffer(f"grid{i}", torch.stack((xs, ys), 2).view(1, 1, n, n, 2).float() - 0.5)
                anchors = torch.tensor([[6.0, 8.0], [12.0, 10.0]]) * (i + 1)
                self.register_buffer(f"anchor{i}", anchors.view(1, na, 1, 1, 2))

        def forward(self, x):
            f1 = self.b1(x)
            z = []
            for i, f in enumerate((f1, self.b2(f1))):
                bs, _, ny, nx = f.shape
                y = self.m[i](f).view(bs, na, 5 + nc, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
                xy, wh, conf = y.split((2, 2, nc + 1), 4)
                xy = (xy * 2 + getattr(self, f"grid{i}")) * self.strides[i]
                wh = (wh * 2) ** 2 * getattr(self, f"anchor{i}")
                z.append(torch.cat((xy, wh, conf), 4).view(bs, na * nx * ny, 5 + nc))
            return torch.cat(z, 1)

    return Head().eval()


def test_a_yolov5_head_is_told_from_the_graph_and_decoded_with_its_objectness(tmp_path):
    import edgequant

    x = np.random.default_rng(0).uniform(0, 1, (40, 3, 32, 32)).astype(np.float32)
    b = edgequant.export(_tiny_yolov5(), x, out=tmp_path / "v5", progress=False)
    r = b.report
    (head,) = r["heads"]
    # the pieces come through the Concat of the two levels: box columns 0-4, objectness + classes 4-8
    assert (head["axis"], head["rank"], head["parts"]) == (2, 3, [[0, 2], [2, 4], [4, 8]])
    assert head["pattern"] == "decode-tail" and any("sigmoid" in n for n in head["float_nodes"])
    boxes, scores = r["fidelity"][0]["parts"]
    assert (boxes["index"], scores["index"]) == ("0:4", "4:8") and scores["sqnr_db"] > 25
    det = r["detection"]
    assert det["layout"] == "v5" and det["status"] == "ok" and det["fp32_detections"] > 20, det
    assert det["agreement"] >= 0.9 and b.manifest["detection"] == {"output": head["output"], "layout": "v5"}
    assert r["fidelity_gate"]["passed"]


def test_v5_decode_multiplies_objectness_and_unknown_layouts_are_refused():
    from edgequant._runtime.edgequant_detect import decode
    from edgequant.check.detection import detection_layout, unsupported

    out = np.zeros((3, 7), np.float32)  # 3 anchors, 4 box + objectness + 2 classes
    out[:, :4] = (10, 10, 8, 8), (50, 50, 8, 8), (90, 90, 8, 8)
    out[:, 4] = (0.9, 0.2, 0.6)  # objectness
    out[:, 5:] = (0.1, 0.8), (0.9, 0.0), (0.5, 0.45)
    d = decode(out, conf=0.25, layout="v5")
    # anchor 0: 0.9 x 0.8 (class 1); anchor 1: 0.2 x 0.9 = 0.18 < conf; anchor 2: 0.6 x 0.5 (class 0)
    assert d.classes.tolist() == [1, 0] and d.scores.tolist() == pytest.approx([0.72, 0.30])
    # read as v8 the objectness row would be scored as a class
    with pytest.raises(ValueError, match="v8 detection output must be"):
        decode(out, layout="v8")
    with pytest.raises(ValueError, match="layout must be one of v8, v5, not 'v7'"):
        decode(out, layout="v7")
    assert detection_layout({"rank": 3, "axis": 1, "parts": [[0, 4], [4, 7]]}) == "v8"
    assert detection_layout({"rank": 3, "axis": 2, "parts": [[0, 4], [4, 8]]}) == "v5"
    assert detection_layout({"rank": 3, "axis": 2, "parts": [[0, 2], [2, 4], [4, 8]]}) == "v5"
    seg = {"rank": 3, "axis": 1, "parts": [[0, 4], [4, 84], [84, 116]]}  # v8-seg: boxes, scores, mask coefficients
    odd = {"output": "o", "rank": 2, "axis": 1, "parts": [[0, 1], [1, 10]]}
    assert detection_layout(seg) is None and detection_layout(odd) is None
    entry = unsupported(odd)
    assert entry["status"] == "unsupported" and "\n" not in entry["summary"] and "neither" in entry["summary"]
