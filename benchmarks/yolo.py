"""YOLOv8n (ultralytics, built from its yaml: random weights, nothing downloaded) through ``edgequant export``:
score-branch and box-branch SQNR, detection agreement (the bundle's reference NMS on fp32 and int8, matched
boxes at IoU ≥ 0.5 and same class), peak memory and time of the whole command, and the bundle's int8/fp32
latency (batch 1, one thread, interleaved, p50; ``--latency-runs``).

Random weights as ultralytics initialises them make a constant output (class scores ~1e-4 everywhere,
boxes the anchors): nothing to detect or compare. They are rescaled (LSUV, see ``_unit_variance_init``) so
that activations carry the input through the network and the heads' logits spread like a trained model's. Calibration and
held-out data: crops of scikit-learn's two bundled photographs (every 5th sample held out).

The export runs as a subprocess under an address-space limit (``--limit-gb``, default 12), so it can never
take the machine down; peak RSS is that process's high-water mark.

    python benchmarks/yolo.py [--size 640] [--samples 160] [--model yolov8n.yaml] [--json out.json]

``run(size, samples, model)`` returns the same figures as a dict (for the model-zoo benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PROBE = """
import resource, sys
from edgequant.cli import cli
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    u = resource.getrusage(resource.RUSAGE_SELF)
    print("PEAK_KIB", u.ru_maxrss, "CPU_S", round(u.ru_utime + u.ru_stime, 1), flush=True)
"""


def build(model: str | None = None):
    """The ultralytics detector from its yaml (``EDGEQUANT_YOLO`` or yolov8n.yaml), random weights rescaled
    (``_unit_variance_init``), in export mode (one output: (4 + 80, anchors) boxes xywh + class scores)."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = DetectionModel(model or os.environ.get("EDGEQUANT_YOLO", "yolov8n.yaml"), nc=80, verbose=False).eval()
    head = m.model[-1]
    for mod in m.modules():
        if hasattr(mod, "export"):
            mod.export = True
        if hasattr(mod, "format"):
            mod.format = "onnx"
    _unit_variance_init(m, head)
    return m


def _unit_variance_init(m, head) -> None:
    """Random weights whose activations neither vanish nor explode (LSUV: each learned Conv rescaled, in graph
    order, to unit output std on two natural crops), then the heads set to look like a trained detector's:
    class logits std 3 around -4 (most anchors below 0.25, some above), DFL logits std 3 (peaked bins)."""
    import torch

    sys.path.insert(0, str(HERE))
    from efficientnet_lite import MEAN, STD, crops

    x = torch.from_numpy(crops(2, 160, seed=99) * STD + MEAN)
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.weight.requires_grad]
    seen = {}
    with torch.no_grad():
        for conv in convs:
            h = conv.register_forward_hook(lambda mod, i, o: seen.__setitem__("y", o))
            m(x)
            h.remove()
            std = float(seen["y"].std())
            if std > 0:
                conv.weight.mul_(1.0 / std)
                if conv.bias is not None:
                    conv.bias.mul_(1.0 / std)
        for name, p in head.named_parameters():
            if name.endswith("bias") and name.split(".")[0] in ("cv2", "cv3") and p.ndim == 1:
                last = p.numel() in (head.nc, 4 * head.reg_max)
                if last:
                    p.fill_(-4.0 if p.numel() == head.nc else 0.0)
        for seq in (*head.cv2, *head.cv3):
            seq[-1].weight.mul_(3.0)


def cpu_features() -> str:
    """This CPU's int8 features as the device adapter reads them (CPUID: under qemu, the emulated CPU's)."""
    from edgequant._runtime.edgequant_runtime import cpu_features as read, describe_cpu

    return describe_cpu(read())

def write_samples(folder: Path, n: int, size: int) -> None:
    sys.path.insert(0, str(HERE))
    from efficientnet_lite import MEAN, STD, crops

    for i in range(n):
        x = crops(1, size, seed=i)[0] * STD + MEAN  # back to RGB in 0–1, as YOLO takes it
        np.save(folder / f"{i:04d}.npy", x.astype(np.float32))


def run(size: int = 640, samples: int = 160, model: str = "yolov8n.yaml", limit_gb: float = 12.0,
        layer_report: bool = True, latency_runs: int = 20) -> dict:
    """Export the detector once in a subprocess → its figures (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="edgequant-yolo-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        write_samples(data, samples, size)
        out = tmp / "bundle"
        cmd = ["prlimit", f"--as={int(limit_gb * 1e9)}", sys.executable, "-c", PROBE, "export",
               f"{HERE / 'yolo.py'}:build", "--calibrate", str(data), "-o", str(out), "--no-progress"]
        env = {**os.environ, "EDGEQUANT_YOLO": model}
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        peak = int(res.stdout.split("PEAK_KIB")[-1].split()[0]) if "PEAK_KIB" in res.stdout else None
        row = {"model": model, "size": size, "samples": samples, "cpu": cpu_features(), "ok": res.returncode == 0,
               "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 2**20, 2) if peak else None,
               "cpu_s": float(res.stdout.split("CPU_S")[-1].split()[0]) if "CPU_S" in res.stdout else None}
        if res.returncode != 0:
            row["error"] = (res.stderr.strip().splitlines() or ["?"])[-1][:300]
            return row
        rep = json.loads((out / "report.json").read_text())
        fid = rep["fidelity"][0]
        parts = {p["index"]: p for p in fid.get("parts", [])}
        det = rep.get("detection") or {}
        row.update({
            "timings": rep["timings"],
            "cosine": fid["cosine"],
            "box_sqnr_db": parts.get("0:4", {}).get("sqnr_db"),
            "score_sqnr_db": next((p["sqnr_db"] for k, p in parts.items() if k != "0:4"), None),
            "score_correlation": next((p["correlation"] for k, p in parts.items() if k != "0:4"), None),
            "detection_agreement": det.get("agreement"),
            "detection": det.get("summary"),
            "heads": [(h["pattern"], len(h["float_nodes"])) for h in rep.get("heads", [])],
            "int8_convs": (rep.get("kernels") or {}).get("int8", {}).get("QLinearConv"),
        })
        if latency_runs:
            row.update(_latency(out, size, latency_runs))
        return row


def _latency(bundle: Path, size: int, runs: int) -> dict:
    """int8 vs fp32 of the bundle: batch 1, one thread, interleaved, p50 (edgequant.bench)."""
    from edgequant.bench import interleaved_latency

    x = np.load(sorted((bundle.parent / "data").glob("*.npy"))[0])[None]
    import onnx

    inp = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.input[0]
    batch = max(1, inp.type.tensor_type.shape.dim[0].dim_value)  # the export may fix the tracing batch
    lat = interleaved_latency({"fp32": str(bundle / "model.fp32.onnx"), "int8": str(bundle / "model.onnx")},
                              {inp.name: np.repeat(x.reshape(1, 3, size, size), batch, axis=0)}, threads=1,
                              runs=runs, warmup=3)
    return {"latency_batch": batch, "fp32_ms": round(lat["fp32"].p50_ms, 2), "int8_ms": round(lat["int8"].p50_ms, 2),
            "latency_ratio": round(lat["int8"].p50_ms / lat["fp32"].p50_ms, 3),
            "latency_spread": round(max(v.spread for v in lat.values()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--limit-gb", type=float, default=12.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--latency-runs", type=int, default=20, help="interleaved int8/fp32 runs (0: no latency)")
    args = ap.parse_args()
    row = run(args.size, args.samples, args.model, args.limit_gb, latency_runs=args.latency_runs)
    for k, v in row.items():
        print(f"{k:>22}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
