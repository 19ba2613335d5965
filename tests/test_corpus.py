"""The conformance corpus (benchmarks/corpus.py): its registry, task metrics, and a fast subset of hand-made
graphs run through edgequant and ONNX Runtime's quantizer in this process."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import corpus  # noqa: E402
import corpus_metrics as cm  # noqa: E402
from corpus_graphs import GRAPHS  # noqa: E402
from corpus_sources import graphs  # noqa: E402


def test_the_corpus_has_sixty_graphs_from_six_sources():
    every = graphs()
    sources = {g.source for g in every.values()}
    assert len(every) >= 60
    assert len(sources) >= 6
    assert {g.name for g in every.values() if g.trained} >= {"wheel/ppocrv4_rec", "wheel/ppocrv4_det", "wheel/silero_vad"}


def test_every_hand_made_graph_runs_in_onnxruntime_at_its_opset():
    import onnxruntime as ort

    every = graphs()
    for name, (build, opset) in GRAPHS.items():
        model = build()
        assert model.opset_import[0].version == opset
        g = every[f"hand/{name}"]
        feed = g.data(model, 1, 0)[0]
        outs = ort.InferenceSession(model.SerializeToString()).run(None, feed)
        assert all(np.isfinite(o).all() for o in outs), name


def test_ctc_decoding_merges_repeats_and_drops_blanks():
    chars = list("abc")
    # T = 6 steps over blank, a, b, c, space: a a _ b _ b → "abb"; c space c → "c c"
    seq = np.eye(5)[[1, 1, 0, 2, 0, 2]][None]
    seq2 = np.eye(5)[[3, 3, 4, 0, 3, 0]][None]
    assert cm.ctc_decode(np.concatenate([seq, seq2]), chars) == ["abb", "c c"]


def test_detection_agreement_counts_matched_boxes():
    pred = np.zeros((1, 4 + 2, 3), np.float32)
    pred[0, :4, 0] = [50, 50, 20, 20]
    pred[0, 4, 0] = 0.9  # class 0 at anchor 0
    pred[0, :4, 1] = [10, 10, 8, 8]
    pred[0, 5, 1] = 0.8  # class 1 at anchor 1
    moved = pred.copy()
    moved[0, 0, 0] += 2  # IoU 0.82: still a match
    moved[0, 5, 1] = 0.1  # the second detection lost
    assert cm.detection_f1(pred, pred, 2) == 1.0
    assert cm.detection_f1(pred, moved, 2) == pytest.approx(2 / 3)


def test_map_metrics():
    a = np.zeros((1, 2, 4, 4), np.float32)
    a[0, 1, :2] = 1  # top half class 1
    b = a.copy()
    b[0, 1, 1] = 0  # one row less of class 1
    assert cm.map_iou(a, a) == 1.0
    assert cm.map_iou(a, b) == pytest.approx((0.5 + 8 / 12) / 2)
    assert cm.mask_iou(a[:, 1], b[:, 1], 0.3) == 0.5


# worst output SQNR measured (16 calibration, 8 held-out inputs): multi_io 35.3 dB, int64_tokens 19.1 dB (random
# tokens through a 100-row embedding), bool_mask 44.8 dB, attention 32.3 dB, nhwc_image 43.7 dB, cnn_opset23 39.6 dB
SUBSET = {"hand/multi_io": 33.0, "hand/int64_tokens": 17.0, "hand/bool_mask": 42.0, "hand/attention": 30.0,
          "hand/nhwc_image": 41.0, "hand/cnn_opset23": 37.0}


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    corpus.RESULTS = tmp_path_factory.mktemp("corpus")
    out = {}
    for name in SUBSET:
        corpus.prepare(name)
        tools = {t: corpus.run_tool(t, name) for t in ("edgequant", "ort")}
        out[name] = (tools, corpus.evaluate(name, list(tools)))
    return out


@pytest.mark.parametrize("name", SUBSET)
def test_the_subset_is_written_and_faithful(subset, name):
    tools, ev = subset[name]
    assert tools["edgequant"]["outcome"] == "written", tools["edgequant"]
    assert tools["edgequant"]["peak_gb"] > 0
    sqnr = ev["edgequant"]["sqnr_db"]
    assert sqnr and min(sqnr.values()) >= SUBSET[name], sqnr
    assert ev["edgequant"]["float_left"] == 0
    assert tools["ort"]["outcome"] == "written"


def test_edgequant_takes_the_samples_without_their_batch_axis(subset):
    folder = corpus.folder_of("hand/multi_io")
    calib = pickle.loads((folder / "calib.pkl").read_bytes())
    model = onnx.load(str(folder / "fp32.onnx"))
    got = corpus.unbatched(model, calib)
    assert len(got) == corpus.CALIB
    assert got[0]["img"].shape == (3, 24, 24) and got[0]["vec"].shape == (12,)
    gru = GRAPHS["gru_state"][0]()  # time-major: x (20, batch, 8), state (1, batch, 16)
    feed = graphs()["hand/gru_state"].data(gru, 1, 0)
    assert {k: v.shape for k, v in corpus.unbatched(gru, feed)[0].items()} == {"x": (20, 8), "h0": (1, 16)}
    loop = GRAPHS["loop_recurrent"][0]()  # the int64 scalar trip count is given as it is
    feed = graphs()["hand/loop_recurrent"].data(loop, 1, 0)
    assert corpus.unbatched(loop, feed)[0]["steps"].shape == ()
    fixed = GRAPHS["cnn_opset11"][0]()  # a batch the export fixed at 1
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert corpus.unbatched(fixed, [{"x": np.zeros((1, 3, 32, 32), np.float32)}])[0]["x"].shape == (3, 32, 32)
