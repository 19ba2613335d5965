"""The CLI: the main job, and one clear line with exit 1 (nothing written) for each kind of bad input."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from edgequant.cli import cli

from conftest import DIGITS

TINY = textwrap.dedent("""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Gate()

        def forward(self, x):
            return self.body(x)

    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:          # data-dependent Python control flow: not traceable
                return x * 2
            return x

    def build():
        torch.manual_seed(0)
        return Tiny()

    def branchy():
        return Branchy()

    def not_a_model():
        return {"weights": 1}
    """)


@pytest.fixture()
def tiny(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        np.save(data / f"{i:02d}.npy", rng.standard_normal((1, 8, 8)).astype(np.float32))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def assert_user_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_digits_writes_bundle_and_table(tmp_path):
    out = tmp_path / "digits"
    result = invoke("export", f"{DIGITS / 'model.py'}:build", "--calibrate", DIGITS / "data", "-o", out,
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert "QLinearConv" in result.output and "no Conv/MatMul/Gemm left in float" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["edgequant_runtime.py", "golden.npz", "layers.png",
                                                     "manifest.json", "manifest.sha256", "model.fp32.onnx",
                                                     "model.onnx", "report.html", "report.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_export_an_onnx_file_and_stacked_npy(tiny, tmp_path):
    first = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", tiny / "b1",
                   "--no-progress")
    assert first.exit_code == 0, first.output
    stacked = tiny / "stack.npy"
    np.save(stacked, np.stack([np.load(p) for p in sorted((tiny / "data").glob("*.npy"))]))
    second = invoke("export", tiny / "b1" / "model.fp32.onnx", "--calibrate", stacked, "-o", tiny / "b2",
                    "--method", "percentile", "--no-progress")
    assert second.exit_code == 0, second.output
    report = json.loads((tiny / "b2" / "report.json").read_text())
    assert report["method"] == "percentile" and report["kernels"]["float_compute"] == []


def test_targets_lists_builtin_profiles():
    result = invoke("targets")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {"generic-cpu", "x86-avx2", "x86-vnni", "arm64"} <= set(names)


@pytest.mark.parametrize("case", ["missing", "empty", "shapes", "dtypes", "nan", "inf", "wrong-shape", "mixed"])
def test_bad_data(tiny, case):
    data = tiny / f"bad-{case}"
    data.mkdir()
    if case != "missing" and case != "empty":
        for i in range(4):
            np.save(data / f"{i}.npy", np.zeros((1, 8, 8), np.float32))
    if case == "shapes":
        np.save(data / "9.npy", np.zeros((1, 8, 9), np.float32))
    elif case == "dtypes":
        np.save(data / "9.npy", np.zeros((1, 8, 8), np.int32))
    elif case == "nan":
        np.save(data / "3.npy", np.full((1, 8, 8), np.nan, np.float32))
    elif case == "inf":
        np.save(data / "0.npy", np.full((1, 8, 8), np.inf, np.float32))
    elif case == "wrong-shape":
        for i in range(4):
            np.save(data / f"{i}.npy", np.zeros((1, 6, 6), np.float32))
    elif case == "mixed":
        np.savez(data / "z.npz", x=np.zeros((1, 8, 8), np.float32))
    if case == "missing":
        data.rmdir()
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", data, "-o", tiny / "out", "--no-progress")
    needle = {"missing": "does not exist", "empty": "has no .npy", "shapes": "differs from", "dtypes": "int32",
              "nan": "3.npy: contains NaN", "inf": "0.npy: contains Inf", "wrong-shape": "[1, 6, 6]",
              "mixed": "mixes"}[case]
    assert_user_error(result, needle)
    assert not (tiny / "out").exists()


@pytest.mark.parametrize("ref,needle", [
    ("no_colon_here", "is not a reference"),
    ("missing.py:build", "not found"),
    ("tiny.py:nope", "has no attribute 'nope'"),
    ("tiny.py:not_a_model", "not a torch.nn.Module"),
    ("no.such.module:build", "cannot import module"),
    ("tiny.py:branchy", "module 'body' (Gate)"),
])
def test_bad_model_reference(tiny, ref, needle):
    if ".py:" in ref:
        ref = f"{tiny / ref.split(':')[0]}:{ref.split(':')[1]}"
    result = invoke("export", ref, "--calibrate", tiny / "data", "-o", tiny / "out", "--no-progress")
    assert_user_error(result, needle)
    assert not (tiny / "out").exists()


def test_bad_targets(tiny):
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", tiny / "out",
                    "--target", "pentium3")
    assert_user_error(result, "unknown target 'pentium3'", "generic-cpu")
    board = tiny / "board.toml"
    board.write_text('name = "board"\nopset = 18\n[quantization]\nactivation_dtyp = "uint8"\n')
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", tiny / "out",
                    "--target", board)
    assert_user_error(result, "unknown key quantization.'activation_dtyp'")
    board.write_text('name = "board"\nopset = 18\n[quantization]\nper_channel = "yes"\n')
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", tiny / "out",
                    "--target", board)
    assert_user_error(result, "quantization.per_channel must be bool")
    assert not (tiny / "out").exists()


def test_non_empty_output_needs_force(tiny):
    out = tiny / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", out)
    assert_user_error(result, "not empty", "--force")
    assert (out / "keep.txt").read_text() == "precious"
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", out, "--force",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()


def test_failed_write_leaves_output_as_it_was(tiny, monkeypatch):
    import edgequant.bundle.core as bundle

    out = tiny / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old bundle")

    def fail(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle.Staging, "commit", fail)
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", out, "--force",
                    "--no-progress")
    assert result.exit_code == 130
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tiny.iterdir() if p.name.startswith(".out")]


def test_usage_error_exits_2(tiny):
    result = invoke("export", f"{tiny / 'tiny.py'}:build", "-o", tiny / "out")
    assert result.exit_code == 2 and "--calibrate" in result.output


def test_debug_shows_the_traceback(tiny):
    import traceback

    from edgequant.errors import ExportError

    args = ["export", "nowhere.py:build", "--calibrate", str(tiny / "data"), "-o", str(tiny / "out")]
    result = CliRunner().invoke(cli, ["--debug", *args])
    assert result.exit_code == 1 and isinstance(result.exception, ExportError)
    tb = "".join(traceback.format_exception(*result.exc_info))
    # the whole chain, down to the frame that raised it in the model loader
    assert tb.startswith("Traceback (most recent call last)") and "edgequant/cli.py" in tb
    assert "in load_model" in tb and "nowhere.py" in tb
    plain = CliRunner().invoke(cli, args)  # without --debug: one line, no traceback
    assert plain.exit_code == 1 and plain.output.count("\n") == 1 and "Traceback" not in plain.output


def test_opset_is_honoured_or_refused_clearly(tiny):
    import onnx

    ok = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", tiny / "o17",
                "--opset", "17", "--no-progress")
    assert ok.exit_code == 0, ok.output
    model = onnx.load(str(tiny / "o17" / "model.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    bad = invoke("export", f"{tiny / 'tiny.py'}:build", "--calibrate", tiny / "data", "-o", tiny / "o13",
                 "--opset", "13", "--no-progress")
    assert_user_error(bad, "cannot convert the model from opset 18 to 13", "use --opset 18")
    assert not (tiny / "o13").exists()
