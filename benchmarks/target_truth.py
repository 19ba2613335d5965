"""Does the report tell the truth about the device? Three tables, each with the CPU features it ran with.

    python benchmarks/target_truth.py [--aarch64 ~/.cache/edgequant/aarch64] [--out build/target-truth]
                                      [--skip-avx2] [--skip-budget]

1. digits exported for rpi5, arm64, jetson-orin and x86-vnni **on an AVX2-only CPU** (the export runs under
   ``qemu-x86_64-static -cpu Haswell``): the cosine the report gives, the cosine this AVX2 host's own kernels
   would give (the summary's "host" line), and the cosine aarch64 onnxruntime 1.32.0 (emulated Cortex-A76,
   ``tests/aarch64/setup.sh``) computes on the same 60 held-out digits, with the bundle's self-test there.
   jetson-orin and x86-vnni have no device here: aarch64's CPU provider stands in for exact int8 arithmetic.
2. The aarch64 self-test of each bundle the test suite checks there (digits for generic-cpu, arm64, rpi5; the
   examples/qat_digits QAT bundle): PASS/FAIL, argmax agreement, max difference in output steps, and seconds
   under emulation (what it adds to CI).
3. Accuracy budgets on examples/digits_dw (``cosine>=0.9999``, ``>=0.99995``): decided on the held-out share of
   the export's data, then measured on digits that neither calibration nor the search saw: the 450 test digits
   after exporting with 200 training digits (examples/data), and one half of the test digits after exporting
   with the other half (same distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DIGITS = REPO / "examples" / "digits"
TARGETS = ("rpi5", "arm64", "jetson-orin", "x86-vnni")
BUDGETS = ("cosine>=0.9999", "cosine>=0.99995")  # all-int8 digits_dw scores 0.99986 on held-out data


def _export_avx2(out: Path) -> None:
    """Runs inside qemu -cpu Haswell: the four exports, from the digits fp32 graph (torch export once)."""
    import edgequant

    base = edgequant.export(f"{DIGITS / 'model.py'}:build", DIGITS / "data", out=out / "generic-cpu", force=True,
                            progress=False)
    for name in TARGETS:
        edgequant.export(base.fp32_model_path, DIGITS / "data", out=out / name, target=name, force=True,
                         progress=False)


def _holdout() -> np.ndarray:
    from edgequant.data.samples import load_samples
    from edgequant.jobs.ptq import split_holdout

    _, held = split_holdout(load_samples(DIGITS / "data"), None)
    return np.stack([next(iter(held[i].values())) for i in range(len(held))])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


# Runs under the emulated aarch64 python (numpy + onnxruntime only): one sample at a time, so that bundles with
# a fixed batch of 1 (jetson-orin) run as well; level all, one thread.
_ARM_RUN = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2]); name = s.get_inputs()[0].name
np.save(sys.argv[3], np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]))
"""


def _run_each(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _arm_outputs(python: Path, model: Path, x: np.ndarray, work: Path) -> np.ndarray:
    """aarch64 onnxruntime at level all (its own fused kernels), one thread → the model's first output."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "in.npy", x)
    subprocess.run([str(python), "-c", _ARM_RUN, str(model), str(work / "in.npy"), str(work / "out.npy")],
                   check=True, capture_output=True, timeout=900)
    return np.load(work / "out.npy")


def _selftest(python: Path, bundle: Path, *extra: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(bundle / "edgequant_runtime.py"), str(bundle), "--selftest", *extra],
                          capture_output=True, text=True, timeout=900)
    return (proc.stdout.strip() or proc.stderr.strip()), time.perf_counter() - t0


def table_avx2(out: Path, python: Path | None, skip_export: bool) -> None:
    if not skip_export:
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(["qemu-x86_64-static", "-cpu", "Haswell", sys.executable, __file__, "--_export-avx2",
                               str(out)], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit("AVX2 export failed: " + "\n".join(
                line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line)[-2000:])
        print(f"(exports under qemu -cpu Haswell took {time.perf_counter() - t0:.0f} s)")
    x = _holdout()
    print(f"\n1. digits exported on an AVX2-only CPU; {len(x)} held-out digits")
    print(f"{'target':<12} {'export CPU':<22} {'checked in':<13} {'reported':>9} {'AVX2 host':>10} "
          f"{'aarch64':>9} {'|diff|':>8}  aarch64 self-test")
    for name in TARGETS:
        bundle = out / name
        report = json.loads((bundle / "report.json").read_text())
        ref = _run_each(bundle / "model.fp32.onnx", x)
        reported = report["fidelity"][0]["cosine"]
        host = report.get("host_kernels")
        here = f"{host['fidelity'][0]['cosine']:.5f}" if host else "same"
        arm, st = "-", "-"
        if python is not None:
            got = _arm_outputs(python, bundle / "model.onnx", x, out / "arm" / name)
            arm = f"{_cos(ref, got):.5f}"
            diff = f"{abs(_cos(ref, got) - reported):.1e}"
            # no TensorRT here: aarch64's CPU provider stands in for the target's exact arithmetic
            cpu_only = ("--providers", "CPUExecutionProvider") if name == "jetson-orin" else ()
            st = _selftest(python, bundle, *cpu_only)[0]
            st = re.sub(r"; providers.*", "", st)
        else:
            diff = "-"
        c = report["checked_with"]
        print(f"{name:<12} {c['host_cpu_label']:<22} {c['arithmetic']:<13} {reported:>9.5f} {here:>10} {arm:>9} "
              f"{diff:>8}  {st}")


def table_selftests(out: Path, python: Path) -> None:
    import edgequant

    sys.path.insert(0, str(REPO / "examples" / "qat_digits"))
    import qat_digits

    bundles = {"generic-cpu": out / "ci" / "generic-cpu"}
    edgequant.export(f"{DIGITS / 'model.py'}:build", DIGITS / "data", out=bundles["generic-cpu"], force=True,
                     progress=False)
    fp32 = bundles["generic-cpu"] / "model.fp32.onnx"
    for name in ("arm64", "rpi5"):
        bundles[name] = out / "ci" / name
        edgequant.export(fp32, DIGITS / "data", out=bundles[name], target=name, force=True, progress=False)
    shutil.rmtree(out / "ci" / "qat", ignore_errors=True)
    r = qat_digits.run(out / "ci" / "qat", epochs=4, log=lambda line: None)
    bundles["qat (generic-cpu)"] = r["qat_bundle"].path
    print("\n2. aarch64 self-test of the bundles the suite checks (emulated Cortex-A76, onnxruntime 1.32.0)")
    total = 0.0
    for name, path in bundles.items():
        line, seconds = _selftest(python, path)
        total += seconds
        print(f"{name:<18} {seconds:5.1f} s  {line}")
    print(f"{'all':<18} {total:5.1f} s under emulation")


def table_budget(out: Path) -> None:
    import onnx

    import edgequant
    from edgequant.check.fidelity import fidelity

    sys.path.insert(0, str(DIGITS))
    from model import load_split

    _, _, x_test, _ = load_split()
    data = [np.load(p) for p in sorted((DIGITS / "data").glob("*.npy"))]
    half = len(x_test) // 2
    # (data the export sees: calibration + held-out share for the search, unseen samples measured afterwards)
    setups = [("200 train (examples)", data[:200], "450 test", x_test),
              (f"test[:{half}]", list(x_test[:half]), f"test[{half}:]", x_test[half:]),
              (f"test[{half}:]", list(x_test[half:]), f"test[:{half}]", x_test[:half])]
    print("\n3. budgets on digits_dw, measured afterwards on samples neither calibration nor the search saw "
          "(examples/data are training digits; the test digits are the model's unseen split)")
    print(f"{'budget':<16} {'export data':<21} {'held':>4} {'estimate':>9} {'95% interval':>21} {'met':>4} "
          f"{'float':>5} {'unseen':<12} {'cosine':>9} {'holds':>5}")
    for budget in BUDGETS:
        bound = float(budget.split(">=")[1])
        for label, samples, unseen_label, unseen in setups:
            b = edgequant.export(f"{REPO / 'examples' / 'digits_dw' / 'model.py'}:build", samples,
                                 out=out / "budget" / "b", accuracy_budget=budget, force=True, progress=False,
                                 layer_report=False)
            rep = b.report["accuracy_budget"]
            level = b.report["checked_with"]["onnxruntime_level"]
            cos = fidelity(onnx.load(str(b.fp32_model_path)), onnx.load(str(b.model_path)),
                           [{"x": x} for x in unseen], level=level)[0].cosine
            lo, hi = rep.get("interval") or rep["all_int8_interval"]
            print(f"{budget:<16} {label:<21} {rep['samples']:>4} {rep['value']:>9.6f} {f'{lo:.6f} .. {hi:.6f}':>21} "
                  f"{'yes' if rep['met'] else 'no':>4} {len(rep['float_nodes']):>5} {unseen_label:<12} {cos:>9.6f} "
                  f"{'yes' if cos >= bound else 'NO':>5}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--_export-avx2":
        _export_avx2(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aarch64", type=Path, default=Path(os.environ.get("EDGEQUANT_AARCH64") or
                                                         Path.home() / ".cache" / "edgequant" / "aarch64"))
    ap.add_argument("--out", type=Path, default=REPO / "build" / "target-truth")
    ap.add_argument("--skip-avx2", action="store_true", help="reuse the AVX2 exports already in --out")
    ap.add_argument("--skip-budget", action="store_true")
    args = ap.parse_args()
    from edgequant._runtime.edgequant_runtime import cpu_features, describe_cpu

    f = cpu_features()
    print(f"host CPU: {describe_cpu(f)} (flags {' '.join(f['flags'])}, from {f['source']})")
    python = args.aarch64 / "python"
    if not python.is_file():
        print(f"no emulated aarch64 python at {args.aarch64}: run tests/aarch64/setup.sh {args.aarch64}")
        python = None
    table_avx2(args.out, python, args.skip_avx2)
    if python is not None:
        table_selftests(args.out, python)
    if not args.skip_budget:
        table_budget(args.out)


if __name__ == "__main__":
    main()
