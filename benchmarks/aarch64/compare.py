"""x86-64 vs emulated aarch64 ONNX Runtime: same models, same inputs, outputs compared.

Builds a float MatMul+Add model, a 2-layer Conv model and a small MobileNet-like CNN with onnx.helper,
quantizes them to int8 QDQ with ONNX Runtime's quantize_static (s8 activations, s8 symmetric per-channel
weights: the settings of edgequant's arm64 target), runs every model on this host's onnxruntime and on the
aarch64 one (``setup.sh ROOT_DIR``), and
reports the largest output difference, in float and, for QDQ outputs, in steps of the output's quantization
scale, plus the op types each side's optimized graph runs (QLinearConv etc. on ARM, where ORT fuses s8 QDQ).

    python benchmarks/aarch64/compare.py ROOT_DIR [--model extra.onnx ...] [--json out.json]

Only the outputs mean anything: timings under qemu say nothing about a real ARM CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_ort import environment, run_job  # noqa: E402

OPSET = 18
IR_VERSION = 10  # not onnx's newest: the aarch64 side may run an older onnxruntime (1.20 reads IR <= 10)


def matmul_add(rng: np.random.Generator) -> onnx.ModelProto:
    w = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def two_conv(rng: np.random.Generator) -> onnx.ModelProto:
    def he(*shape):  # keeps activations O(1) through both layers, as a trained net's would be
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for a, n in [
        (he(16, 3, 3, 3), "w1"), ((rng.standard_normal(16) * 0.1).astype(np.float32), "b1"),
        (he(8, 16, 3, 3), "w2"), ((rng.standard_normal(8) * 0.1).astype(np.float32), "b2")]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "two_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def small_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """A MobileNet-like block: more of ORT's ARM int8 kernels than two_conv (depthwise QLinearConv, QLinearAdd,
    QLinearGlobalAveragePool, QLinearMatMul), whose results could differ from x86 where plain convolutions do not."""
    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    def bias(n):
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for a, n in [
        (he(16, 3, 3, 3), "w1"), (bias(16), "b1"), (he(16, 1, 3, 3), "w2"), (bias(16), "b2"),
        (he(32, 16, 1, 1), "w3"), (bias(32), "b3"), ((rng.standard_normal((32, 10)) / 6).astype(np.float32), "w4"),
        (bias(10), "b4")]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=16),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Add", ["r1", "r2"], ["s"]),
        helper.make_node("Conv", ["s", "w3", "b3"], ["c3"]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "w4"], ["m"]),
        helper.make_node("Add", ["m", "b4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def quantize_qdq(fp32_path: Path, out: Path, samples: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice is moot for these graphs

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def random_inputs(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded inputs for any model (free dimensions 1), from the same generator as edgequant bench's."""
    from edgequant.bench import random_inputs as bench_inputs

    return bench_inputs(model, 1, rng=rng)


def output_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Graph outputs produced by a per-tensor DequantizeLinear → that scale (the size of one int8 step)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] in inits and inits[node.input[1]].size == 1:
            scales[node.output[0]] = float(inits[node.input[1]])
    return {o.name: scales[o.name] for o in model.graph.output if o.name in scales}


def op_types(path: Path) -> str:
    counts = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return ", ".join(f"{op}×{n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="ROOT_DIR made by setup.sh (holds the `python` wrapper)")
    ap.add_argument("--model", type=Path, action="append", default=[], help="also compare this ONNX model")
    ap.add_argument("--level", default="all", choices=["disable", "basic", "extended", "all"])
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    wrapper = args.root.resolve() / "python"
    if not os.access(wrapper, os.X_OK):
        ap.error(f"{wrapper} missing: run benchmarks/aarch64/setup.sh {args.root} first")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgequant-aarch64-") as tmp:
        tmp = Path(tmp)
        models: dict[str, Path] = {}
        for name, build in [("matmul_add", matmul_add), ("two_conv", two_conv), ("small_cnn", small_cnn)]:
            fp32 = build(rng)
            models[name] = tmp / f"{name}.onnx"
            onnx.save(fp32, models[name])
            calib = [random_inputs(fp32, rng) for _ in range(16)]
            models[f"{name}_qdq"] = tmp / f"{name}_qdq.onnx"
            quantize_qdq(models[name], models[f"{name}_qdq"], calib)
        builtin = set(models)
        for path in args.model:
            name = path.stem
            while name in models:  # a user's two_conv_qdq.onnx must not be taken for the built-in one
                name += "+"
            models[name] = path.resolve()

        runs = {"x86": [], "arm": []}
        for name, path in models.items():
            # A built-in QDQ model gets its fp32 original's inputs, so the two outputs can be compared too.
            feeds = name.removesuffix("_qdq") if name in builtin else name
            if not (tmp / f"{feeds}.in.npz").exists():
                np.savez(tmp / f"{feeds}.in.npz", **random_inputs(onnx.load(str(path)), rng))
            for side in runs:
                runs[side].append({"model": str(path), "inputs": str(tmp / f"{feeds}.in.npz"),
                                   "outputs": str(tmp / f"{name}.{side}.out.npz"),
                                   "optimized": str(tmp / f"{name}.{side}.opt.onnx")})
        run_job({"level": args.level, "runs": runs["x86"]})
        x86_env = environment()
        job = tmp / "arm_job.json"
        job.write_text(json.dumps({"level": args.level, "runs": runs["arm"], "info": str(tmp / "arm_info.json")}))
        subprocess.run([str(wrapper), str(HERE / "run_ort.py"), str(job)], check=True)
        arm_env = json.loads((tmp / "arm_info.json").read_text())

        for side, env in [("x86", x86_env), ("arm", arm_env)]:
            print(f"{side:4} {env['machine']:7} python {env['python']}  numpy {env['numpy']}  "
                  f"onnxruntime {env['onnxruntime']}  providers {env['providers']}")
        results = []
        for name, path in models.items():
            scales = output_scales(onnx.load(str(path)))
            x86, arm = np.load(tmp / f"{name}.x86.out.npz"), np.load(tmp / f"{name}.arm.out.npz")
            # The fp32 model's output, for the QDQ ones: how far int8 itself is from float, for scale.
            base = name.removesuffix("_qdq")
            fp32 = np.load(tmp / f"{base}.x86.out.npz") if name in builtin and base != name else None
            for out in x86.files:
                a, b = x86[out].astype(np.float64), arm[out].astype(np.float64)
                diff = np.abs(a - b)
                r = {"model": name, "output": out, "shape": list(a.shape), "max_abs_diff": float(diff.max()),
                     "differing": int((diff > 0).sum()), "elements": int(diff.size),
                     "abs_max": float(np.abs(a).max())}
                if out in scales:
                    r["scale"] = scales[out]
                    r["max_diff_steps"] = float(diff.max() / scales[out])
                if fp32 is not None and out in fp32.files:
                    r["x86_int8_vs_fp32_max_abs"] = float(np.abs(a - fp32[out]).max())
                r["x86_kernels"] = op_types(tmp / f"{name}.x86.opt.onnx")
                r["arm_kernels"] = op_types(tmp / f"{name}.arm.opt.onnx")
                results.append(r)

    print()
    for r in results:
        line = (f"{r['model']:15} {r['output']:6} max|x86-arm| {r['max_abs_diff']:.3g}"
                f"  ({r['differing']}/{r['elements']} differ, |y| max {r['abs_max']:.3g})")
        if "scale" in r:
            line += f"  = {r['max_diff_steps']:.2f} int8 steps (scale {r['scale']:.3g})"
        if "x86_int8_vs_fp32_max_abs" in r:
            line += f"  [int8 vs fp32 on x86: {r['x86_int8_vs_fp32_max_abs']:.3g}]"
        print(line)
        print(f"{'':15}   x86 runs: {r['x86_kernels']}")
        print(f"{'':15}   arm runs: {r['arm_kernels']}")
    if args.json:
        args.json.write_text(json.dumps({"x86": x86_env, "arm": arm_env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
