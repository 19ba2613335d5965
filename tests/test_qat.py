"""Quantization-aware training: it recovers what PTQ loses, the int8 bundle computes what the QAT model computes,
the placement equals PTQ's, it trains under DDP and Lightning Fabric, and bad input is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import edgequant
from edgequant import qat
from edgequant.cli import cli

from conftest import DIGITS, ROOT, load_example_module, residual_block, run_onnx

QAT_DIGITS = ROOT / "examples" / "qat_digits"
DW = ROOT / "examples" / "digits_dw"


def _kernels(bundle):
    return bundle.report["kernels"]["int8"], bundle.report["kernels"]["float_compute"]


def _check_agreement(qmodel, model_path, x):
    """ORT on the bundle vs the QAT module in PyTorch: argmax agreement and max |diff| in output steps."""
    import onnx
    from onnx import numpy_helper

    with torch.no_grad():
        ref = qmodel.eval()(torch.from_numpy(x)).numpy()
    got = run_onnx(model_path, x)
    graph = onnx.load(str(model_path)).graph
    producer = next(n for n in graph.node if graph.output[0].name in n.output)
    assert producer.op_type == "DequantizeLinear"
    step = float(numpy_helper.to_array(next(i for i in graph.initializer if i.name == producer.input[1])))
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return agree, float(np.abs(ref - got).max()) / step


def test_qat_recovers_what_ptq_loses(qat_example):
    _, r = qat_example
    assert r["fp32"] - r["ptq"] >= 1.5, r          # the PTQ drop is real: 97.78% -> 95.56%
    assert r["qat"] >= r["fp32"] - 0.5, r          # QAT recovers to within half a point of fp32
    assert r["qat"] >= r["ptq"] + 1.5, r
    report = r["qat_bundle"].report
    assert report["source"] == "qat"
    assert report["qat"]["weight_bits"] == 3 and report["qat"]["target"] == "generic-cpu"
    assert r["qat_bundle"].manifest["quantization"]["source"] == "qat"


def test_int8_bundle_computes_what_the_qat_model_computes(qat_example, digits_split):
    _, r = qat_example
    _, _, x_test, _ = digits_split
    agree, steps = _check_agreement(r["qmodel"], r["qat_bundle"].path / "model.onnx", x_test)
    assert agree >= 0.995 and steps <= 2.0, (agree, steps)
    reported = r["qat_bundle"].report["qat"]["agreement"][0]
    assert reported["argmax_agreement"] >= 0.995 and reported["max_abs_error_steps"] <= 2.0


def _placement(bundle):
    """What ONNX Runtime's CPU provider runs: int8 kernels, other ops, and the op types left in float."""
    k = bundle.report["kernels"]
    return k["int8"], k["other"], sorted(name.split(":")[0] for name in k["float_compute"])


def _without_kernel_rewrites(target, tmp_path):
    """A built-in target → a copy of its profile with the rewrites for its int8 kernels off (channel padding,
    HardSigmoid as Add): what a QAT export does on it, so PTQ and QAT are compared like with like."""
    from importlib import resources

    text = resources.files("edgequant._toolchains").joinpath(f"{target}.toml").read_text()
    for key, off in (("depthwise_channel_align", "0"), ("input_channel_align", "0"), ("int8_hardsigmoid", "false"),
                     ("softmax_inner_axis", "false"), ("float_where_faster", "false")):
        text = "\n".join(f"{key} = {off}" if line.startswith(f"{key} =") else line for line in text.splitlines())
    path = tmp_path / f"{target}-as-qat.toml"
    path.write_text(text)
    return str(path)


def test_qat_and_ptq_quantize_the_same_ops(qat_example, tmp_path):
    _, r = qat_example
    generic = _without_kernel_rewrites("generic-cpu", tmp_path)
    ptq_dw = edgequant.export(f"{DW / 'model.py'}:build", DIGITS / "data", out=tmp_path / "ptq_dw", target=generic,
                              progress=False)
    assert _placement(r["qat_bundle"]) == _placement(ptq_dw)
    assert _placement(r["qat_bundle"])[0] == {"QGemm": 1, "QLinearConv": 9, "QLinearGlobalAveragePool": 1}

    # residual blocks (BatchNorm, functional relu, Add), MaxPool, Flatten, an RGB input (which PTQ would pad on
    # generic-cpu); u8 (generic-cpu) and s8 (arm64) activations
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), residual_block(16),
                          residual_block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    data = [np.random.default_rng(i).standard_normal((3, 32, 32)).astype(np.float32) for i in range(20)]
    for target, ptq_target in (("generic-cpu", generic), ("arm64", "arm64")):
        ptq = edgequant.export(model, data, out=tmp_path / f"ptq_{target}", target=ptq_target, progress=False)
        qmodel = qat.prepare(model, torch.from_numpy(np.stack(data[:4])), target=target, calibration=data)
        bundle = qat.export(qmodel, out=tmp_path / f"qat_{target}", calibration=data, progress=False)
        assert _placement(bundle) == _placement(ptq), target
        agree = bundle.report["qat"]["agreement"][0]
        assert agree["argmax_agreement"] >= 0.995 and agree["max_abs_error_steps"] <= 2.0, (target, agree)
        # the manifest says what the QAT export did: none of the target's kernel rewrites
        q = bundle.manifest["quantization"]
        assert (q["depthwise_channel_align"], q["input_channel_align"], q["int8_hardsigmoid"]) == (0, 0, False)
    # arm64 asks only for the exact Softmax rewrite, which the QAT export does not make either
    assert bundle.report["qat"].get("target_rewrites_not_applied") == ["softmax_inner_axis"]
    generic_qat = edgequant.load_bundle(tmp_path / "qat_generic-cpu").report["qat"]
    assert generic_qat["target_rewrites_not_applied"] == ["depthwise_channel_align", "input_channel_align",
                                                         "int8_hardsigmoid", "softmax_inner_axis",
                                                         "float_where_faster"]


def test_ddp_two_processes_export_like_one(qat_example, digits_split, tmp_path):
    example, r = qat_example
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(QAT_DIGITS / "ddp.py"), "--epochs", "1", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scales = [torch.load(tmp_path / f"scales{rank}.pt") for rank in (0, 1)]
    assert scales[0].keys() == scales[1].keys() and len(scales[0]) == 12
    assert all(torch.equal(scales[0][k], scales[1][k]) for k in scales[0])   # all ranks hold the same scales
    bundle = edgequant.load_bundle(tmp_path / "bundle")
    assert _kernels(bundle) == _kernels(r["qat_bundle"])
    x_train, _, x_test, _ = digits_split
    qmodel = qat.load_checkpoint(example.dw.build(), torch.from_numpy(x_train[:32]), tmp_path / "checkpoint.pt")
    agree, steps = _check_agreement(qmodel, bundle.path / "model.onnx", x_test)
    assert agree >= 0.995 and steps <= 2.0, (agree, steps)


def test_fabric_training_and_cli_checkpoint_export(qat_example, digits_split, tmp_path):
    _, r = qat_example
    fabric_example = load_example_module(QAT_DIGITS / "fabric.py", "_qat_digits_fabric")
    module, bundle = fabric_example.run(tmp_path / "fabric", epochs=1, log=lambda line: None)
    assert _kernels(bundle) == _kernels(r["qat_bundle"])
    _, _, x_test, _ = digits_split
    agree, steps = _check_agreement(module.module, bundle.path / "model.onnx", x_test)
    assert agree >= 0.995 and steps <= 2.0, (agree, steps)

    out = tmp_path / "cli"
    res = CliRunner().invoke(cli, ["export", f"{DW / 'model.py'}:build", "--calibrate", str(DIGITS / "data"),
                                   "--qat-checkpoint", str(tmp_path / "fabric" / "checkpoint.pt"), "-o", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "qat" in res.output.splitlines()[0]
    assert res.output.splitlines()[-1].startswith("qat      linear vs the QAT model in PyTorch: argmax agreement")
    assert np.array_equal(run_onnx(out / "model.onnx", x_test), run_onnx(bundle.path / "model.onnx", x_test))
    # the checkpoint's scales were trained for its target: another --target is a usage error, nothing written
    trained_for = edgequant.load_bundle(out).report["target"]
    other = "arm64" if trained_for != "arm64" else "generic-cpu"
    res = CliRunner().invoke(cli, ["export", f"{DW / 'model.py'}:build", "--calibrate", str(DIGITS / "data"),
                                   "--qat-checkpoint", str(tmp_path / "fabric" / "checkpoint.pt"),
                                   "-o", str(tmp_path / "other"), "--target", other, "--no-progress"])
    assert res.exit_code == 2, res.output
    assert f"--target {other} does not match the QAT checkpoint's target {trained_for}" in res.output
    assert not (tmp_path / "other").exists()


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:          # data-dependent Python control flow
            return x * 2
        return x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_model_names_the_module():
    with pytest.raises(edgequant.ExportError, match=r"module 'gate' \(Gate\) cannot be traced by torch.fx") as exc:
        qat.prepare(Branchy(), torch.zeros(2, 1, 8, 8))
    assert "\n" not in str(exc.value)


def test_example_inputs_that_do_not_fit_name_the_module():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(edgequant.ExportError, match=r"module '0' \(Conv2d\) failed: RuntimeError: Given groups"):
        qat.prepare(model, torch.zeros(2, 3, 8, 8))


def test_export_of_an_unprepared_module_writes_nothing(digits_module, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(edgequant.ExportError, match="needs a module returned by edgequant.qat.prepare"):
        qat.export(digits_module.build(), out=out, calibration=DIGITS / "data")
    assert not out.exists()


def test_target_the_model_cannot_meet(digits_module):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(edgequant.UnsupportedOnTarget, match="generic-cpu limits weights to 7 bits"):
        qat.prepare(digits_module.build(), x, target="generic-cpu", weight_bits=8)
    with pytest.raises(edgequant.UnsupportedOnTarget, match="quantizes none of the layers of Sequential"):
        qat.prepare(nn.Sequential(nn.ReLU(), nn.Softmax(1)), x)


def test_frozen_bn_and_learned_scales_train_and_export_exactly(digits_module, digits_split, tmp_path):
    from edgequant.qat.modules import QuantConv

    model = digits_module.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_train, y_train, x_test, _ = digits_split
    qmodel = qat.prepare(model, torch.from_numpy(x_train[:64]), bn="freeze", learn_scales=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())          # model untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # input, three Conv+ReLU outputs (ReLU absorbed, MaxPool shares), pooled features, logits: six LSQ scales
    scales = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith(".scale")}
    assert len(scales) == 6
    assert [m.bn is not None for m in qmodel.modules() if isinstance(m, QuantConv)] == [True] * 3   # BN frozen
    assert qat.freeze_observers(qmodel) == 6
    torch.manual_seed(0)
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    for i in range(0, 640, 64):
        x, y = torch.from_numpy(x_train[i:i + 64]), torch.from_numpy(y_train[i:i + 64])
        loss = nn.functional.cross_entropy(qmodel(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = dict(qmodel.named_parameters())
    assert all(not torch.equal(learned[n], s) for n, s in scales.items())                # the scales trained
    bundle = qat.export(qmodel, out=tmp_path / "lsq", calibration=x_test[:200], progress=False)
    assert bundle.report["qat"]["learn_scales"] and bundle.report["qat"]["bn"] == "freeze"
    agree, steps = _check_agreement(qmodel, bundle.path / "model.onnx", x_test)
    assert agree >= 0.995 and steps <= 2.0, (agree, steps)


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["export", f"{DW / 'model.py'}:build", "--calibrate", str(DIGITS / "data"),
                                   "--qat-checkpoint", str(tmp_path / "nope.pt"), "-o", str(out)])
    assert res.exit_code == 1
    assert res.output.strip().startswith("error: QAT checkpoint") and len(res.output.strip().splitlines()) == 1
    assert not out.exists()
