"""int8/fp32 latency of vision models on this CPU, edgequant's default bundle against ONNX Runtime's quantizer,
with the kernel choices the export made (``pip install -e .[zoo]``; ultralytics for YOLOv8n).

    python benchmarks/cpu_speed.py [--only resnet18,mobilenet_v3_large,efficientnet_lite0,yolov8n] [--runs 40]
    ../shared/tools/as-avx2 python benchmarks/cpu_speed.py      # the same as an AVX2-only CPU

Per model: the generic-cpu bundle (``edgequant.export`` defaults, 32 calibration crops; its kernel choices are
measured on this machine during the export, see docs/targets.md), ONNX Runtime's ``quantize_static`` U8S8
per-channel reduce_range on the same fp32 graph and crops, and fp32, timed interleaved, batch 1, one thread, p50.
Prints the CPU features, fp32 ms, both ratios against the goal (and, where the export made an exact float
rewrite such as softmax-inner-axis, edgequant's ratio against fp32 with that rewrite too; the bundle timed again
in a second session, which shows how much the same graph moves; and from ONNX Runtime's profiles the int8
convolution/GEMM kernels' time against the float ones, the floor no Q/DQ placement gets below with these kernels), the choices with their measured gains, and the
seconds the choices cost the export. ResNet-18 and MobileNetV3-Large have seeded random weights (BatchNorm
statistics from crops), EfficientNet-Lite0 its pretrained weights, YOLOv8n random weights (benchmarks/yolo.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOALS = {"resnet18": "ort", "mobilenet_v3_large": 0.75, "efficientnet_lite0": 0.55, "yolov8n": 0.60}


def _model(name: str, size: int):
    """A benchmark model by name → (nn.Module, calibration crops as (N, 3, size, size) float32)."""
    from zoo_models import crops, efficientnet_lite0, torchvision_model

    if name == "yolov8n":
        from efficientnet_lite import MEAN, STD
        from yolo import build

        return build(), (crops(40, size, seed=1) * STD + MEAN).astype(np.float32)  # RGB in 0-1, as YOLO takes it
    model = efficientnet_lite0() if name == "efficientnet_lite0" else torchvision_model(name, size)
    return model, crops(40, size, seed=1)


def cost_model(fp32_path: Path, data: np.ndarray) -> dict[str, float | None]:
    """The fp32 model → the cost model's ratio per kernel choice (docs/targets.md), for x86-64: what the export
    would decide where this machine could not time the target's kernels."""
    from dataclasses import replace

    from edgequant.config import ExportConfig
    from edgequant.jobs import choices, ptq, stages

    cfg = ExportConfig.from_options(str(fp32_path), data, out=fp32_path.parent / "unused", progress=False).validate()
    run = stages.open_run(cfg)
    stages.load(run)
    ptq.fp32_graph(run)
    run.checked = replace(run.checked, arithmetic="exact")  # not this machine's kernels: the cost model decides
    choices.kernel_choices(run)
    return {d["key"]: d["ratio"] for d in run.parts["kernel_choices"]["decisions"]}


def exact_rewrites(fp32):
    """The fp32 graph with the export's exact speed rewrites (softmax-inner-axis) → that graph, or None where
    none applies: the int8 ratio is quoted against it too, so that a float rewrite is not counted as int8 gain."""
    import onnx_ir as ir

    from edgequant.graph.rewrite import softmax_inner_axis

    model = ir.serde.deserialize_model(fp32)
    return ir.serde.serialize_model(model) if softmax_inner_axis(model) else None


def kernel_floor(fp32, int8, inputs) -> dict[str, float]:
    """ONNX Runtime's profiles of fp32 and the bundle (batch 1, one thread) → the time of the int8 convolution and
    GEMM kernels against the float ones: the lowest int8/fp32 ratio any placement of Q/DQ could reach with these
    kernels (everything else in int8 for free)."""
    from edgequant.check.node_times import profile

    def total(model, ops):
        times, types, _ = profile(model, inputs, threads=1, level="all", runs=30)
        return sum(ms for n, ms in times.items() if types[n] in ops)

    int8_ms = total(int8, ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger"))
    float_ms = total(fp32, ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"))
    return {"int8_kernels_ms": round(int8_ms, 3), "float_kernels_ms": round(float_ms, 3),
            "ratio": round(int8_ms / float_ms, 3)}


def run(name: str, runs: int, size: int) -> dict:
    import onnx
    from compare_ort import ort_quantize
    from onnxruntime.quantization import QuantFormat, QuantType

    import edgequant
    from edgequant.bench import interleaved_latency

    model, data = _model(name, size)
    with tempfile.TemporaryDirectory() as tmp:
        b = edgequant.export(model, data[:32], out=Path(tmp) / "b", progress=False, layer_report=False)
        fp32, int8 = onnx.load(str(b.fp32_model_path)), onnx.load(str(b.model_path))
        inp = fp32.graph.input[0].name
        modelled = cost_model(b.fp32_model_path, data[:8])
        ort = ort_quantize(b.fp32_model_path, [{inp: d} for d in data[:32]], Path(tmp) / "ort.onnx",
                           quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    # the bundle twice, in two sessions: how far the same graph moves with where its session's memory lands
    models = {"fp32": fp32, "edgequant": int8, "ort": ort, "edgequant_again": int8}
    rewritten = exact_rewrites(fp32)
    if rewritten is not None:  # the exact float rewrites the export made, on fp32 too: what they gain by themselves
        models["fp32_rewritten"] = rewritten
    lat = interleaved_latency(models, {inp: data[32:33]}, runs=runs, warmup=3)
    floor = kernel_floor(fp32, int8, {inp: data[32:33]})
    base = lat["fp32"].p50_ms
    report = b.report
    return {"model": name, "fp32_ms": round(base, 2), "edgequant": round(lat["edgequant"].p50_ms / base, 3),
            "edgequant_vs_fp32_rewritten": round(lat["edgequant"].p50_ms / lat["fp32_rewritten"].p50_ms, 3)
            if rewritten is not None else None,
            "edgequant_again": round(lat["edgequant_again"].p50_ms / base, 3), "kernel_floor": floor,
            "ort_u8s8_pc_rr": round(lat["ort"].p50_ms / base, 3), "cosine": report["fidelity"][0].get("cosine"),
            "kernel_choices": report["kernel_choices"], "choices_s": round(report["timings"]["kernel_choices_s"], 1),
            "export_s": round(report["timings"]["total_s"], 1), "cost_model": modelled,
            "spread": {k: round(v.spread, 3) for k, v in lat.items()}}


def main() -> None:
    from mobile_accuracy import cpu_features

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(GOALS))
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--yolo-size", type=int, default=640)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"CPU features: {cpu_features()}; batch 1, one thread, interleaved, p50")
    out = []
    for name in args.only.split(","):
        r = run(name, args.runs, args.yolo_size if name == "yolov8n" else 224)
        out.append(r)
        goal = GOALS[name]
        goal_text = f"<= ORT's {r['ort_u8s8_pc_rr']:.3f}" if goal == "ort" else f"<= {goal}"
        met = r["edgequant"] <= (r["ort_u8s8_pc_rr"] if goal == "ort" else goal)
        c = r["kernel_choices"] or {"decisions": [], "ratio_vs_plain": None, "fallback": None}
        choices = ", ".join(f"{d['key']} {'kept' if d['kept'] else 'off'}"
                            + (f" {d['ratio']:.3f}x" if d["ratio"] else " (n/a)") for d in c["decisions"]) or "none"
        print(f"{name:20s} fp32 {r['fp32_ms']:7.2f} ms  edgequant {r['edgequant']:.3f}x  ORT U8S8 pc rr "
              f"{r['ort_u8s8_pc_rr']:.3f}x  goal {goal_text}: {'met' if met else 'MISSED'}  cosine "
              f"{r['cosine']:.4f}")
        f = r["kernel_floor"]
        print(f"{'':20s} same bundle, second session {r['edgequant_again']:.3f}x; int8 conv/GEMM kernels "
              f"{f['int8_kernels_ms']} ms against float {f['float_kernels_ms']} ms = {f['ratio']:.3f}x (the floor)")
        if r["edgequant_vs_fp32_rewritten"] is not None:
            print(f"{'':20s} against fp32 with the same exact float rewrites: edgequant "
                  f"{r['edgequant_vs_fp32_rewritten']:.3f}x")
        print(f"{'':20s} choices ({r['choices_s']} s of {r['export_s']} s export): {choices}; set vs plain "
              f"{c['ratio_vs_plain']}" + (f"; {c['fallback']}" if c["fallback"] else ""))
        print(f"{'':20s} cost model (x86-64): " + ", ".join(f"{k} {v:.3f}x" for k, v in r["cost_model"].items()
                                                            if v is not None))
        print(f"{'':20s} spread (p90-p50)/p50: {r['spread']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
