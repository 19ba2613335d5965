"""The public surface: sorted and complete __all__, no torch on import, and the Python API mirrors the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import edgequant


def test_all_is_sorted_and_resolves():
    assert list(edgequant.__all__) == sorted(edgequant.__all__)
    for name in edgequant.__all__:
        assert getattr(edgequant, name) is not None


def test_import_does_not_load_torch():
    code = "import sys, edgequant; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_export_takes_a_module_and_in_memory_samples(tmp_path, digits_module, digits_split):
    x_train, _, _, _ = digits_split
    model = digits_module.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bundle = edgequant.export(model, list(x_train[:50]), out=tmp_path / "b", method="mse", progress=False)
    assert bundle.report["calibration"]["samples"] == 40 and bundle.report["method"] == "mse"
    assert all((before[k] == v).all() for k, v in model.state_dict().items())  # caller's model untouched
    assert bundle.report["fidelity"][0]["argmax_agreement"] >= 0.9
    assert np.isfinite(bundle.report["fidelity"][0]["cosine"])
