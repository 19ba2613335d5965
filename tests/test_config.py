"""The export config: every option a job does not take is refused (API: UsageError naming the option; CLI: exit 2
naming the flag) before anything is read or written; the options a job takes reach it; every report has the same
top-level keys and a schema version."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import edgequant
from edgequant.bundle.report import REPORT_KEYS, REPORT_SCHEMA_VERSION
from edgequant.cli import cli
from edgequant.config import ExportConfig
from edgequant.transforms.algorithms import Algorithms

from conftest import DIGITS

TEXT = ["a cup of tea", "the robot arm", "a red light", "a small dog", "the night sky"]


def _job_inputs(job, tmp_path, minilm_folder=None):
    """(model, data, options that select the job) without loading anything: validate() needs no model."""
    model = f"{DIGITS / 'model.py'}:build"
    if job == "ptq":
        return model, DIGITS / "data", {}
    if job == "weight-only":
        return model, DIGITS / "data", {"weights": "q8"}
    if job == "qat":
        return model, DIGITS / "data", {"qat_checkpoint": tmp_path / "checkpoint.pt"}
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return folder, TEXT, {}


# (option, value, the job that refuses it, words of the reason). One row per option × job that does not take it.
REFUSED = [
    ("method", "mse", "weight-only", "keeps activations in float"),
    ("method", "mse", "qat", "learned in training"),
    ("algorithms", Algorithms(equalize=True), "weight-only", "quantizes weights in blocks"),
    ("algorithms", Algorithms(bias_correction=True), "weight-only", "quantizes weights in blocks"),
    ("algorithms", Algorithms(smooth_quant=True), "weight-only", "quantizes weights in blocks"),
    ("algorithms", Algorithms(equalize=True), "qat", "training fixed it"),
    ("algorithms", Algorithms(smooth_quant=True), "text", "always smooths"),
    ("accuracy_budget", "sqnr>=250", "weight-only", "no int8 activations"),
    ("accuracy_budget", "cosine>=0.99", "qat", "no float fallback search"),
    ("accuracy_budget", "cosine>=0.99", "text", "use exclude_nodes"),
    ("layer_report", False, "weight-only", "post-training quantization with int8 activations"),
    ("layer_report", False, "text", "post-training quantization with int8 activations"),
    ("layer_report", False, "qat", "post-training quantization with int8 activations"),
    ("allow_inaccurate", True, "weight-only", "post-training quantization with int8 activations"),
    ("allow_inaccurate", True, "text", "post-training quantization with int8 activations"),
    ("allow_inaccurate", True, "qat", "post-training quantization with int8 activations"),
    ("exclude_nodes", ["node_Conv_0"], "qat", "qat.prepare"),
    ("num_samples", 8, "qat", "every sample of the data"),
    ("num_samples", 8, "weight-only", "limits GPTQ's calibration"),
    ("opset", 17, "qat", "its target's opset"),
    ("input_shapes", {"": (1, 1, 8, 8)}, "qat", "static_shapes"),
    ("input_shapes", {"": (1, 128)}, "text", "fixes the token axis"),
    ("weights", "q4", "qat", "quantizes activations too"),
    ("task", "text-classification", "ptq", "applies only to Hugging Face models"),
    ("task", "text-classification", "weight-only", "applies only to Hugging Face models"),
    ("task", "text-classification", "qat", "applies only to Hugging Face models"),
    ("max_length", 64, "ptq", "applies only to Hugging Face models"),
    ("max_length", 64, "weight-only", "applies only to Hugging Face models"),
    ("max_length", 64, "qat", "applies only to Hugging Face text models"),
    ("labels", np.zeros(300, np.int64), "ptq", "top1 accuracy budgets only"),
    ("labels", np.zeros(300, np.int64), "text", "does not apply to Hugging Face text models"),
    ("block_size", 64, "ptq", "applies only to weight-only quantization"),
    ("dynamic", True, "weight-only", "keeps them in float"),
    ("preprocess", edgequant.ImagePreprocess(), "text", "text data is tokenized"),
]


@pytest.mark.parametrize("option, value, job, words", REFUSED, ids=[f"{o}-{j}" for o, _, j, _ in REFUSED])
def test_api_refuses_an_option_the_job_does_not_take(option, value, job, words, tmp_path):
    model, data, select = _job_inputs(job, tmp_path)
    config = ExportConfig.from_options(model, data, out=tmp_path / "out", **select, **{option: value})
    assert config.job == (job if not (option == "dynamic") else "text")
    with pytest.raises(edgequant.UsageError, match=words) as err:
        edgequant.export(model, data, out=tmp_path / "out", **select, **{option: value})
    message = str(err.value)
    assert message.split()[0].startswith(option if option != "algorithms" else "algorithms=Algorithms(")
    assert "--" not in message.split()[0]  # named as the Python argument it is
    assert not (tmp_path / "out").exists()


CLI_REFUSED = [
    (["--weights", "q8", "--accuracy-budget", "sqnr>=250"], "--accuracy-budget searches which int8 nodes"),
    (["--weights", "q8", "--equalize"], "--equalize rebalances int8 activations and weights"),
    (["--weights", "q8", "--bias-correction"], "--bias-correction rebalances"),
    (["--weights", "q8", "--no-layer-report"], "--no-layer-report"),
    (["--qat-checkpoint", "ckpt.pt", "--method", "entropy"], "--method does not apply to a QAT checkpoint"),
    (["--qat-checkpoint", "ckpt.pt", "--exclude", "node_Conv_0"], "--exclude does not apply to a QAT checkpoint"),
    (["--qat-checkpoint", "ckpt.pt", "--equalize"], "--equalize does not apply to a QAT checkpoint"),
    (["--qat-checkpoint", "ckpt.pt", "--opset", "17"], "--opset does not apply to a QAT checkpoint"),
    (["--max-length", "64"], "--max-length applies only to Hugging Face models"),
    (["--labels", "labels.npy"], "--labels serve top1 accuracy budgets only"),
]


@pytest.mark.parametrize("args, words", CLI_REFUSED, ids=[" ".join(a) for a, _ in CLI_REFUSED])
def test_cli_refuses_with_a_usage_error(args, words, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["export", f"{DIGITS / 'model.py'}:build", "--calibrate", str(DIGITS / "data"),
                                   "-o", str(out), *args])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and words in last and "Traceback" not in res.output
    assert not out.exists()


def test_unknown_option_names_the_closest():
    with pytest.raises(edgequant.UsageError, match="no option 'num_sample'; did you mean num_samples"):
        ExportConfig.from_options("m.py:build", "data", out="x", num_sample=8)


def test_cli_and_api_build_the_same_config(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("edgequant.jobs.run_job", lambda config, job=None: seen.append(config) or _Stop())
    res = CliRunner().invoke(cli, ["export", "m.py:build", "--calibrate", "data", "-o", str(tmp_path / "b"),
                                   "--target", "rpi5", "--method", "entropy", "--num-samples", "9", "--exclude", "n1",
                                   "--equalize", "--accuracy-budget", "cosine>=0.99", "--batch-size", "4"])
    assert isinstance(res.exception, _StopError), res.output
    api = ExportConfig.from_options("m.py:build", "data", out=tmp_path / "b", target="rpi5", method="entropy",
                                    num_samples=9, exclude_nodes=["n1"], algorithms=Algorithms(equalize=True),
                                    accuracy_budget="cosine>=0.99", batch_size=4)
    assert seen[0] == api


class _StopError(Exception):
    pass


def _Stop():
    raise _StopError


def test_weight_only_takes_input_shapes(digits_bundle, tmp_path):
    """An option that applies is honoured, not dropped: weight-only with fixed input shapes."""
    bundle = edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=tmp_path / "b", weights="q8",
                              input_shapes={"": (1, 1, 8, 8)}, progress=False)
    assert bundle.manifest["inputs"][0]["shape"] == [1, 1, 8, 8]


def test_every_report_has_the_same_keys_and_a_schema_version(digits_bundle, tmp_path):
    wo = edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=tmp_path / "wo", weights="q8",
                          progress=False)
    for report in (digits_bundle.report, wo.report):
        assert tuple(report) == REPORT_KEYS
        assert report["schema_version"] == REPORT_SCHEMA_VERSION
    assert wo.report["accuracy_budget"] is None and wo.report["weights"]["layers"] == 1
