"""examples/detection end to end: the shipped detector (trained on generated shapes) exported from its PNG
folder, detection agreement in the report, device-side NMS on camera-like frames, detections drawn."""

from __future__ import annotations

import pytest

from conftest import ROOT, load_example_module

EXAMPLE = ROOT / "examples" / "detection"


@pytest.fixture(scope="module")
def example():
    import sys

    sys.path.insert(0, str(EXAMPLE))
    try:
        yield load_example_module(EXAMPLE / "detect.py", "_detection_example")
    finally:
        sys.path.remove(str(EXAMPLE))


@pytest.fixture(scope="module")
def bundle(example, tmp_path_factory):
    return example.export(tmp_path_factory.mktemp("detection") / "bundle")


def test_report_has_the_head_and_detection_agreement(bundle):
    r = bundle.report
    (head,) = r["heads"]
    assert head["pattern"] == "decode-tail+dfl" and head["parts"] == [[0, 4], [4, 7]]
    boxes, scores = r["fidelity"][0]["parts"]
    assert scores["correlation"] > 0.99 and boxes["correlation"] > 0.99
    det = r["detection"]
    assert det["status"] == "ok" and det["fp32_detections"] >= 12 and det["agreement"] >= 0.9
    assert r["fidelity_gate"]["passed"] and r["kernels"]["int8"]["QLinearConv"] >= 6
    assert bundle.manifest["preprocess"]["channel_order"] == "rgb"


def test_device_detections_find_the_drawn_shapes_and_are_drawn(example, bundle, tmp_path):
    images, truth = example.generate(32, seed=4321)
    dets = example.detect(bundle.path, images)
    assert example.recall(dets, truth) >= 0.85
    png = tmp_path / "detections.png"
    example.draw(images, dets, png)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (64 * 4 * 4 + 30, 64 * 4 * 2 + 10)
        assert len(set(im.getdata())) > 1000  # a picture, not a blank sheet
