"""Peak memory of a whole export is flat in the number of samples: every stage streams (calibration in
batches that fit a fixed activation budget, fidelity folded batch by batch, the per-layer table on at most
32 held-out samples). Measured in fresh subprocesses, on a fully convolutional model whose output is large
(512 KiB per sample), so that anything kept per sample would show."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 8, 1)).eval()
''')

PROBE = textwrap.dedent('''
    import json, resource, sys
    from edgequant.cli import cli
    try:
        cli.main(sys.argv[1:], standalone_mode=False)
    finally:
        print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
''')


def _peak_kib(tmp_path, n: int) -> int:
    data = tmp_path / f"data{n}"
    data.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        np.save(data / f"{i:04d}.npy", rng.uniform(0, 1, (3, 128, 128)).astype(np.float32))
    res = subprocess.run([sys.executable, "-c", PROBE, "export", f"{tmp_path / 'model.py'}:build", "--calibrate",
                          str(data), "-o", str(tmp_path / f"out{n}"), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / f"out{n}" / "report.json").read_text())
    assert report["holdout"]["samples"] == n // 5 and report["fidelity_gate"]["passed"]
    return int(res.stdout.split("PEAK_KIB")[-1].split()[0])


def test_export_peak_memory_is_flat_in_samples(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    small, large = _peak_kib(tmp_path, 100), _peak_kib(tmp_path, 500)
    # 5× the samples, all in full batches (100 held out instead of 20: 40 MiB more outputs per model if they
    # were kept) → under 20 MiB more
    assert large - small < 20 * 1024, (small, large)
