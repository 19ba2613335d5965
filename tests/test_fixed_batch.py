"""An .onnx whose batch is fixed (PyTorch's legacy exporter, batch 1 or 4) calibrates and checks in the batch
it allows; long failure lines are cut where no expression is open."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import DIGITS, load_example_module
from edgequant.cli import cli
from edgequant.frontend.torch_export import clip_line


@pytest.fixture(scope="module")
def fixed_onnx(tmp_path_factory):
    import torch

    model = load_example_module(DIGITS / "model.py", "_digits_fixed_batch").build()
    root = tmp_path_factory.mktemp("fixed")
    paths = {}
    for b in (1, 4):
        paths[b] = root / f"digits_b{b}.onnx"
        torch.onnx.export(model, torch.zeros(b, 1, 8, 8), paths[b], dynamo=False, input_names=["x"])
    return paths


@pytest.mark.parametrize("batch,args", [(1, []), (1, ["--input-shape", "x:1,1,8,8"]), (1, ["--target", "jetson-orin"]),
                                        (4, [])])
def test_fixed_batch_onnx_exports(fixed_onnx, tmp_path, batch, args):
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["export", str(fixed_onnx[batch]), "--calibrate", str(DIGITS / "data"), "-o",
                                   str(out), "--no-progress", *args])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "argmax agreement 100.00%" in res.output


def test_too_few_samples_for_a_fixed_batch_is_one_line(fixed_onnx, tmp_path):
    import numpy as np

    data = tmp_path / "three.npy"
    np.save(data, np.zeros((3, 1, 8, 8), np.float32))
    res = CliRunner().invoke(cli, ["export", str(fixed_onnx[4]), "--calibrate", str(data), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "fixed at 4" in res.output
    assert not (tmp_path / "o").exists()


def test_long_lines_are_cut_outside_expressions():
    guard = ("Could not guard on data-dependent expression Eq(Max(1, u0), Max(1, u0 + " + "u1 + " * 60 + "1)) "
             "(unhinted: Eq(Max(1, u0), 1)). consider using data-dependent friendly APIs such as guard_or_false")
    cut = clip_line(guard)
    assert cut.endswith(" …") and cut.count("(") == cut.count(")") and len(cut) < 450
    assert clip_line("short line") == "short line"
