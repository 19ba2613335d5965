"""edgequant vs ONNX Runtime's own ``quantize_static``, on the same fp32 graphs, in one run.

Rows: the digits CNN (accuracy on the digits test split) and a ResNet-18-shaped CNN (3×224×224, random
weights: speed and size). Columns: accuracy or fidelity, int8/fp32 latency at batch 1 on one thread
(all variants interleaved), int8/fp32 file size, and which Conv/MatMul/Gemm ONNX Runtime leaves in float.

    python benchmarks/compare_ort.py [--runs 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import edgequant  # noqa: E402
from edgequant.bench import interleaved_latency  # noqa: E402
from edgequant.check.fidelity import cpu_kernels, session  # noqa: E402


def ort_quantize(fp32_path: Path, samples: list[dict], out: Path, **settings) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static on the same fp32 graph and calibration samples."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            s = next(self.it, None)
            return None if s is None else {k: v[None] for k, v in s.items()}

    quantize_static(str(fp32_path), str(out), Reader(), **settings)
    return onnx.load(str(out))


def ort_variants(fp32_path: Path, samples: list[dict], tmp: Path) -> dict[str, onnx.ModelProto]:
    from onnxruntime.quantization import QuantFormat, QuantType

    return {
        "ort defaults (QDQ S8S8)": ort_quantize(fp32_path, samples, tmp / "ort_default.onnx"),
        "ort S8S8 per-channel": ort_quantize(fp32_path, samples, tmp / "ort_s8s8_pc.onnx", per_channel=True),
        "ort U8S8 per-ch reduce_range": ort_quantize(
            fp32_path, samples, tmp / "ort_u8s8.onnx", quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
    }


def evaluate(name: str, fp32: onnx.ModelProto, variants: dict[str, onnx.ModelProto], score, runs: int,
             inputs: dict) -> list[dict]:
    lat = interleaved_latency({"fp32": fp32, **variants}, inputs, threads=1, runs=runs)
    fp32_bytes = len(fp32.SerializeToString())
    rows = [{"model": name, "variant": "fp32", "score": score(fp32), "latency_ratio": 1.0,
             "p50_ms": lat["fp32"].p50_ms, "size_ratio": 1.0, "float_layers": "-", "noise": lat["fp32"].spread}]
    for v, m in variants.items():
        k = cpu_kernels(m)
        rows.append({"model": name, "variant": v, "score": score(m),
                     "latency_ratio": lat[v].p50_ms / lat["fp32"].p50_ms, "p50_ms": lat[v].p50_ms,
                     "size_ratio": len(m.SerializeToString()) / fp32_bytes,
                     "float_layers": f"{len(k.float_compute)} of {len(k.float_compute) + _mac_int8(k)}",
                     "noise": lat[v].spread})
    return rows


def _mac_int8(k) -> int:
    return sum(n for op, n in k.int8.items() if op in ("QLinearConv", "QLinearMatMul", "QGemm",
                                                       "MatMulIntegerToFloat"))


def digits_rows(tmp: Path, runs: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from model import build, load_split  # examples/digits/model.py

    _, _, x_test, y_test = load_split()
    data = ROOT / "examples" / "digits" / "data"
    bundle = edgequant.export(build(), data, out=tmp / "digits", progress=False)
    fp32 = onnx.load(str(bundle.fp32_model_path))
    calib = [edgequant.data.load_samples(data).bind(["x"])[i] for i in range(len(list(data.glob("*.npy"))))]
    calib = [s for i, s in enumerate(calib) if i % 5 != 4]  # the samples edgequant calibrated on

    def acc(m):
        s = session(m)
        logits = s.run(None, {s.get_inputs()[0].name: x_test})[0]
        return float(np.mean(np.argmax(logits, 1) == y_test) * 100)

    variants = {"edgequant (generic-cpu)": onnx.load(str(bundle.model_path)),
                **ort_variants(bundle.fp32_model_path, calib, tmp)}
    return evaluate("digits CNN (test acc %)", fp32, variants, acc, runs, {"x": x_test[:1]})


def resnet_rows(tmp: Path, runs: int) -> list[dict]:
    from models import resnet18

    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((3, 224, 224)).astype(np.float32)} for _ in range(40)]
    bundle = edgequant.export(resnet18(), [s["x"] for s in calib], out=tmp / "resnet", progress=False)
    fp32 = onnx.load(str(bundle.fp32_model_path))
    held = np.stack([rng.standard_normal((3, 224, 224)).astype(np.float32) for _ in range(8)])
    ref = session(fp32).run(None, {"x": held})[0]

    def cosine(m):
        out = session(m).run(None, {"x": held})[0]
        num = np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        return float(np.mean(num))

    used = [s for i, s in enumerate(calib) if i % 5 != 4]
    variants = {"edgequant (generic-cpu)": onnx.load(str(bundle.model_path)),
                **ort_variants(bundle.fp32_model_path, used, tmp)}
    return evaluate("ResNet-18 224 (cosine)", fp32, variants, cosine, runs, {"x": held[:1]})


def table(rows: list[dict]) -> str:
    head = f"{'model':<24} {'variant':<30} {'score':>8} {'int8/fp32 lat':>13} {'p50 ms':>8} {'size':>7} " \
           f"{'float MAC layers':>16} {'noise':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<24} {r['variant']:<30} {r['score']:>8.5f} {r['latency_ratio']:>13.3f} "
                     f"{r['p50_ms']:>8.3f} {100 * r['size_ratio']:>6.1f}% {r['float_layers']:>16} "
                     f"{100 * r['noise']:>5.1f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["digits", "resnet"])
    args = parser.parse_args()
    import logging

    logging.getLogger("root").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        if args.only != "resnet":
            rows += digits_rows(Path(tmp), args.runs)
        if args.only != "digits":
            rows += resnet_rows(Path(tmp), args.runs)
    print(table(rows))
    print("latency: batch 1, 1 thread, ORT CPU provider, p50 of interleaved runs; noise = (p90-p50)/p50")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
