"""The weight-only job's own stages: MatMul/Gemm weights block-quantized (RTN, or GPTQ on the calibration data)
with activations in float. The quantization itself is :mod:`edgequant.quantize.weight_only`; the order of the
stages is in :mod:`edgequant.jobs`."""

from __future__ import annotations

import onnx

from ..check.fidelity import cpu_kernels
from ..frontend.torch_export import convert_opset, prepare_fp32
from ..quantize.weight_only import quantize_weights, weight_bytes
from .stages import Run, report_parts, to_fp32

__all__ = ["fp32_graph", "prepare", "quantize", "settings"]


def prepare(raw: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The exported graph → ORT's basic optimizations at the target's opset (no int8 rewrites: nothing is QDQ)."""
    return convert_opset(prepare_fp32(raw), opset)


def fp32_graph(run: Run) -> None:
    """The model → the fp32 reference graph; a fixed batch axis on static-shape targets."""
    to_fp32(run, dynamic_batch=not run.target.runtime.static_shapes, prepare=prepare)


def quantize(run: Run) -> None:
    """The fp32 graph → MatMulNBits in place of every MatMul/Gemm with a constant weight."""
    cfg = run.config
    config = cfg.weights.config()
    run.int8 = quantize_weights(run.fp32, config, run.calib if config.method == "gptq" else None,
                                exclude_nodes=cfg.calibration.exclude_nodes, batch_size=run.batch_size,
                                progress=cfg.progress)


def settings(run: Run) -> None:
    """The manifest's quantization settings; the report's weights part (what ORT runs: MatMulNBits nodes)."""
    config = run.config.weights.config()
    used = len(run.calib) if config.method == "gptq" else 0
    run.method = config.preset
    run.model_format = "onnx-weight-only"
    run.settings = {"source": "weight-only", **config.to_dict(), "calibration_samples": used}
    kernels = cpu_kernels(run.int8)
    run.parts["weights"] = {**config.to_dict(), **weight_bytes(run.int8),
                            "cpu_matmulnbits_nodes": kernels.int8.get("MatMulNBits", 0),
                            "float_compute": kernels.float_compute}
    run.parts["kernels"] = None  # no int8 activations; what ORT runs is under "weights"
    run.parts["calibration"] = {"data": run.samples.source, "samples": used}
    run.parts.update(report_parts(run))
