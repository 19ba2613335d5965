"""U8U8 against U8S8: the latency of one QDQ int8 MatMul (all-MiniLM-L6-v2's feed-forward, 128 × 384 × 1536) and
one Conv (ResNet-18's 3×3, 64 → 64 channels at 56²) with uint8 weights (zero point 128) against int8 weights (zero
point 0), on ONNX Runtime's CPU provider, batch 1, one thread, interleaved, p50.

    python benchmarks/weight_types.py [--runs 100]
    ../shared/tools/as-avx2 python benchmarks/weight_types.py      # as an AVX2-only CPU

u8·u8 products need no saturating 16-bit pair sums on AVX2 (full 8-bit weights, no pair_saturation), but MLAS
runs them on its U8U8 kernels: the ratio printed is what that costs here, and why the profiles keep int8 weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

_RNG = np.random.default_rng(0)


def _qdq(op: str, x_shape: list[int], w: np.ndarray, unsigned: bool, **attrs):
    """x (float) → Q → DQ → op(·, DQ(w)) → Q → DQ: the QDQ form ONNX Runtime fuses into one int8 kernel."""
    scale = float(np.abs(w).max() / 127)
    q = np.clip(np.round(w / scale), -127, 127)
    wq, zp = ((q + 128).astype(np.uint8), np.uint8(128)) if unsigned else (q.astype(np.int8), np.int8(0))
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.float32(scale), "ws"),
             numpy_helper.from_array(np.array(zp), "wz"), numpy_helper.from_array(np.float32(0.05), "xs"),
             numpy_helper.from_array(np.uint8(128), "xz"), numpy_helper.from_array(np.float32(0.5), "ys"),
             numpy_helper.from_array(np.uint8(128), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             helper.make_node(op, ["xd", "wd"], ["y"], **attrs),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    from mobile_accuracy import cpu_features

    from edgequant.bench import interleaved_latency

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    print(f"CPU features: {cpu_features()}; batch 1, one thread, interleaved, p50")
    cases = {"MatMul 128x384x1536": ("MatMul", [1, 128, 384], _RNG.standard_normal((384, 1536)), {}),
             "Conv 3x3 64->64 at 56x56": ("Conv", [1, 64, 56, 56], _RNG.standard_normal((64, 64, 3, 3)),
                                          {"pads": [1, 1, 1, 1]})}
    for name, (op, shape, w, attrs) in cases.items():
        w = w.astype(np.float32)
        x = _RNG.standard_normal(shape).astype(np.float32)
        models = {"u8s8": _qdq(op, shape, w, False, **attrs), "u8u8": _qdq(op, shape, w, True, **attrs)}
        lat = interleaved_latency(models, {"x": x}, runs=args.runs, warmup=5)
        s8, u8 = lat["u8s8"].p50_ms, lat["u8u8"].p50_ms
        print(f"{name:26s} U8S8 {s8:7.3f} ms  U8U8 {u8:7.3f} ms  U8U8/U8S8 {u8 / s8:.3f}x")


if __name__ == "__main__":
    main()
