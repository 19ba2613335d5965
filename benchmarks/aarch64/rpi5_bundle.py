"""An edgequant bundle for the rpi5 target, run through the bundle's own runtime adapter on x86 and on emulated
aarch64 (Cortex-A76), compared in quantization steps of the output.

    benchmarks/aarch64/setup.sh benchmarks/aarch64/root
    python benchmarks/aarch64/rpi5_bundle.py benchmarks/aarch64/root [--out build/aarch64-rpi5] [--json r.json]

The digits example is exported with ``--target rpi5``; all 1,797 scikit-learn digits go through
``edgequant_runtime.Session`` (the file copied into the bundle, numpy + onnxruntime only) on both sides, with
the manifest's session settings. The model's output is a DequantizeLinear of an int8 tensor, so both sides'
logits lie on the same grid of ``scale`` steps: the difference in steps counts int8 codes. Printed: argmax
agreement (pass: >= 99.5%), the histogram of differences in steps, accuracy of each side against the labels,
and, for every output that differs by more than one step, which kernels each side's optimized graph ran (ORT
fuses more on ARM: int8 activations are kept, where x86 rewrites them to uint8 first). Exit status 1 when
the agreement is below 99.5%. Timing under emulation means nothing and is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from compare import output_scales  # noqa: E402
from run_ort import environment, run_job  # noqa: E402

AGREEMENT = 0.995
# Runs inside the emulator: only the bundle's adapter, numpy and onnxruntime.
ARM_RUNNER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import edgequant_runtime as rt
sess = rt.Session(sys.argv[1])
print(sess.describe())
x = np.load(sys.argv[2])
np.save(sys.argv[3], sess.run(x)[sess.output_names[0]])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="ROOT_DIR made by setup.sh (holds the `python` wrapper)")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "aarch64-rpi5", help="where the bundle goes")
    ap.add_argument("--example", default="digits", choices=["digits", "digits_dw"],
                    help="digits (plain CNN) or digits_dw (depthwise-separable, same data)")
    ap.add_argument("--target", default="rpi5", help="edgequant target (rpi5; rpi4 with AARCH64_CPU=cortex-a72)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    wrapper = args.root.resolve() / "python"
    if not os.access(wrapper, os.X_OK):
        ap.error(f"{wrapper} missing: run benchmarks/aarch64/setup.sh {args.root} first")

    import edgequant

    sys.path.insert(0, str(REPO / "examples" / "digits"))
    from model import load_split

    digits = REPO / "examples" / "digits"
    bundle = edgequant.export(f"{REPO / 'examples' / args.example / 'model.py'}:build", digits / "data",
                              out=args.out / "bundle", target=args.target, force=True, progress=False)
    x_tr, y_tr, x_te, y_te = load_split()
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    scale = output_scales(onnx.load(str(bundle.model_path)))[bundle.manifest["outputs"][0]["name"]]

    sys.path.insert(0, str(bundle.path))
    import edgequant_runtime as rt  # the copy inside the bundle

    with tempfile.TemporaryDirectory(prefix="edgequant-rpi5-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", x)
        x86_sess = rt.Session(bundle.path)
        x86 = x86_sess.run(x)[x86_sess.output_names[0]]
        arm_run = subprocess.run([str(wrapper), "-c", ARM_RUNNER, str(bundle.path), str(tmp / "x.npy"),
                                  str(tmp / "arm.npy")], capture_output=True, text=True)
        if arm_run.returncode != 0:
            print(arm_run.stderr, file=sys.stderr)
            return 1
        arm = np.load(tmp / "arm.npy")
        # the kernels each side's optimized graph runs (same session settings as the adapter's)
        level = bundle.manifest["runtime"]["graph_optimization_level"]
        np.savez(tmp / "one.npz", x=x[:1])
        runs = {side: [{"model": str(bundle.model_path), "inputs": str(tmp / "one.npz"),
                        "outputs": str(tmp / f"{side}.out.npz"), "optimized": str(tmp / f"{side}.opt.onnx")}]
                for side in ("x86", "arm")}
        run_job({"level": level, "runs": runs["x86"]})
        (tmp / "job.json").write_text(json.dumps({"level": level, "runs": runs["arm"], "info": str(tmp / "i.json")}))
        subprocess.run([str(wrapper), str(HERE / "run_ort.py"), str(tmp / "job.json")], check=True)
        arm_env = json.loads((tmp / "i.json").read_text())
        kernels = {side: Counter(n.op_type for n in onnx.load(str(tmp / f"{side}.opt.onnx")).graph.node)
                   for side in ("x86", "arm")}

    steps = np.rint(np.abs(x86.astype(np.float64) - arm.astype(np.float64)) / scale).astype(int)
    agree = float(np.mean(np.argmax(x86, 1) == np.argmax(arm, 1)))
    hist = dict(sorted(Counter(steps.ravel().tolist()).items()))
    rows_over = np.flatnonzero(steps.max(axis=1) > 1)
    figures = {
        "x86": environment(), "arm": arm_env, "arm_placement": arm_run.stdout.strip(), "samples": int(len(x)),
        "output_scale": scale, "argmax_agreement": agree, "max_diff_steps": int(steps.max()),
        "diff_steps_histogram": hist, "samples_over_1_step": int(len(rows_over)),
        "accuracy_x86": float(np.mean(np.argmax(x86, 1) == y)), "accuracy_arm": float(np.mean(np.argmax(arm, 1) == y)),
        "kernels_x86": dict(sorted(kernels["x86"].items())), "kernels_arm": dict(sorted(kernels["arm"].items())),
    }
    for side in ("x86", "arm"):
        env = figures[side]
        print(f"{side:4} {env['machine']:7} python {env['python']}  numpy {env['numpy']}  "
              f"onnxruntime {env['onnxruntime']}")
    print(f"arm  adapter: {figures['arm_placement']}")
    print(f"bundle {bundle.path} (target {args.target}, {args.example}), {len(x)} digits, "
          f"output step (scale) {scale:.4g}")
    print(f"argmax agreement x86 vs aarch64: {100 * agree:.2f}% (pass >= {100 * AGREEMENT:.1f}%)")
    print(f"difference in output steps: histogram {hist}; max {steps.max()}; samples with a gap > 1 step: "
          f"{len(rows_over)}")
    print(f"accuracy vs labels: x86 {100 * figures['accuracy_x86']:.2f}%, aarch64 {100 * figures['accuracy_arm']:.2f}%")
    print(f"x86 kernels: {figures['kernels_x86']}")
    print(f"arm kernels: {figures['kernels_arm']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if agree >= AGREEMENT else 1


if __name__ == "__main__":
    sys.exit(main())
