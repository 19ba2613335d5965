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


def test_module_whose_export_specializes_the_batch_is_exported_at_batch_1(tmp_path, caplog):
    """Shape-dependent code (here a branch on the batch size, as detection heads cache anchors per shape) makes
    torch.export keep the tracing batch of 2: the bundle would refuse single frames, so the export is redone
    at batch 1, with a warning, and calibrates and checks in batches of 1."""
    import logging

    import numpy as np
    import torch
    from torch import nn

    import edgequant

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8 * 6 * 6, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            if x.shape[0] == 2:
                y = y * 1.0
            return self.fc(y.flatten(1))

    x = np.random.default_rng(0).uniform(0, 1, (30, 3, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="edgequant"):
        b = edgequant.export(Cached().eval(), x, out=tmp_path / "b", progress=False)
    assert b.manifest["inputs"][0]["shape"] == [1, 3, 8, 8]
    assert any("does not stay dynamic" in r.getMessage() for r in caplog.records)
    assert b.report["fidelity"][0]["samples"] == 6 and b.report["fidelity"][0]["cosine"] > 0.99
