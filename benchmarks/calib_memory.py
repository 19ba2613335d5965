"""Peak memory of calibration for 100 vs 2,000 samples: edgequant's streaming observers against ONNX Runtime's
in-memory calibrators (``quantize_static``), each run in a fresh process so peak RSS is its own.

    python benchmarks/calib_memory.py [--method percentile] [--counts 100,2000]

The model is a small CNN on 3×64×64 inputs (eight Conv layers, a few MB of activations per sample), so that
activation memory, not weights, dominates; samples are .npy files read lazily from a folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np, torch
from torch import nn
tool, method, data, count, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
layers, cin = [], 3
for cout in (32, 32, 64, 64, 64, 128, 128, 128):
    layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    cin = cout
model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)).eval()
t = time.perf_counter()
if tool == "edgequant":
    import edgequant
    edgequant.export(model, data, out=out, method=method, num_samples=count, progress=False, force=True)
else:
    import pathlib, edgequant
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quantize_static
    b = edgequant.export(model, data, out=out + "-fp32", num_samples=8, progress=False, force=True)
    files = sorted(pathlib.Path(data).glob("*.npy"))[:count]
    name = b.manifest["inputs"][0]["name"]
    class R(CalibrationDataReader):
        def __init__(s): s.it = iter(files)
        def get_next(s):
            f = next(s.it, None)
            return None if f is None else {name: np.load(f)[None]}
    m = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
         "entropy": CalibrationMethod.Entropy}[method]
    quantize_static(str(b.fp32_model_path), out + ".onnx", R(), calibrate_method=m)
# VmHWM is this process's own peak RSS; ru_maxrss would also count the parent's pages from before exec.
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mib": peak_kib / 1024, "seconds": time.perf_counter() - t}))
"""


def run(tool: str, method: str, data: Path, count: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, tool, method, str(data), str(count), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} with {count} samples failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="percentile", choices=["minmax", "percentile", "entropy"])
    parser.add_argument("--counts", default="100,2000")
    parser.add_argument("--ort-counts", default="100,400", help="ORT's calibrator grows fast; keep it small")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    ort_counts = [int(c) for c in args.ort_counts.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        # held-out samples are every 5th: write enough that `count` calibration samples remain
        total = int(max(counts + ort_counts) * 1.25) + 5
        for i in range(total):
            np.save(data / f"{i:05d}.npy", rng.standard_normal((3, 64, 64)).astype(np.float32))
        rows = []
        for count in counts:
            rows.append(("edgequant", count, run("edgequant", args.method, data, count, Path(tmp) / f"eq{count}")))
        for count in ort_counts:
            rows.append(("ort quantize_static", count, run("ort", args.method, data, count, Path(tmp) / f"o{count}")))
    print(f"calibration method: {args.method}; model: 8-layer CNN on 3x64x64; peak RSS of a fresh process")
    print(f"{'tool':<22} {'samples':>8} {'peak MiB':>9} {'seconds':>8}")
    for tool, count, r in rows:
        print(f"{tool:<22} {count:>8} {r['peak_mib']:>9.0f} {r['seconds']:>8.1f}")
    eq = [r for t, _, r in rows if t == "edgequant"]
    if len(eq) >= 2:
        growth = eq[-1]["peak_mib"] / eq[0]["peak_mib"] - 1
        print(f"edgequant peak growth {counts[0]} -> {counts[-1]} samples: {100 * growth:+.1f}% (goal: under 10%)")
    ort = [r for t, _, r in rows if t != "edgequant"]
    if len(ort) >= 2:
        growth = ort[-1]["peak_mib"] / ort[0]["peak_mib"] - 1
        print(f"ort peak growth {ort_counts[0]} -> {ort_counts[-1]} samples: {100 * growth:+.1f}%")


if __name__ == "__main__":
    main()
