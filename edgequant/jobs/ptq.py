"""The post-training quantization job's own stages: fp32 passes (equalization, SmoothQuant) → calibration
(streaming observers, or the best method per tensor) → QDQ quantization (+ bias correction) → accuracy budget →
per-layer error. The order is in :mod:`edgequant.jobs`."""

from __future__ import annotations

import logging
from typing import Any

import onnx

from ..calibration.streaming import METHODS, calibrate as streaming_calibrate, tensors_to_calibrate
from ..frontend.torch_export import convert_opset, prepare_fp32
from ..graph.rewrite import rewrite_for_int8
from ..quantize.qdq import quantize as qdq_quantize, skip_absurd_ranges
from ..transforms.algorithms import Algorithms
from .stages import Run, report_parts, to_fp32

__all__ = ["budget", "calibrate", "fp32_graph", "fp32_passes", "layers", "prepare", "quantize", "settings"]

log = logging.getLogger(__name__)


def prepare(raw: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The exported graph → what PTQ quantizes: ORT's basic optimizations, the int8-friendly rewrites, the opset."""
    return convert_opset(rewrite_for_int8(prepare_fp32(raw)), opset)


def fp32_graph(run: Run) -> None:
    """The model → the fp32 reference graph, traced with a dynamic batch axis (shapes are fixed at the end)."""
    to_fp32(run, dynamic_batch=True, prepare=prepare)


def fp32_passes(run: Run) -> None:
    """The fp32 rewrites that keep the function (equalization, SmoothQuant) → the graph to quantize."""
    from ..transforms.algorithms import equalize_cross_layer, smooth_quant

    algo = run.config.algorithms
    report: dict[str, Any] = algo.to_dict()
    work = run.fp32
    if algo.equalize:
        work, report["equalized_pairs"] = equalize_cross_layer(work)
    if algo.smooth_quant:
        work, report["smoothed_activations"] = smooth_quant(work, run.calib, alpha=algo.smooth_quant_alpha,
                                                            batch_size=run.config.data_options.batch_size,
                                                            limit=algo.max_samples)
    run.work = work
    run.parts["algorithms"] = report


def calibrate(run: Run) -> None:
    """Activation ranges on the calibration samples: one streaming pass of the chosen method, or with
    ``method="auto"`` per tensor the method with the least output error."""
    from tqdm import tqdm

    cfg, tgt = run.config, run.target
    method = run.method = cfg.calibration.method or "minmax"
    batch = cfg.data_options.batch_size
    tensors = tensors_to_calibrate(run.work, tgt.quantization.op_types)
    run.quantize_fn = _quantizer(run.work, tgt, cfg.algorithms, run.calib, batch)
    if method == "auto":
        from ..calibration.auto import auto_ranges

        work = run.work
        run.ranges, picked = auto_ranges(work, run.calib, tensors, lambda r: qdq_quantize(work, r, tgt),
                                         batch_size=batch, limit=cfg.algorithms.max_samples)
        run.parts["algorithms"]["auto_methods"] = {m: sum(v == m for v in picked.values()) for m in METHODS}
    else:
        with tqdm(total=len(run.calib), desc=f"calibrating ({method})", unit="sample", disable=not cfg.progress,
                  leave=False) as bar:
            run.ranges = streaming_calibrate(run.work, run.calib, tensors, method=method, batch_size=batch,
                                             progress=bar.update)


def _quantizer(work: onnx.ModelProto, tgt: Any, algo: Algorithms, calib: Any, batch_size: int):
    """(ranges, float nodes) → int8 model, with the post-quantization algorithms applied."""
    from ..quantize.bias_correction import correct_bias
    from ..transforms.smooth import smooth_muls

    keep_float = smooth_muls(work)

    def run(ranges, exclude):
        int8 = qdq_quantize(work, ranges, tgt, exclude_nodes=[*exclude, *keep_float])
        if algo.bias_correction:
            int8, _ = correct_bias(work, int8, calib, batch_size=batch_size, limit=algo.max_samples)
        return int8

    return run


def quantize(run: Run) -> None:
    """Ranges → the QDQ int8 graph (the target's placement rules; ``--exclude`` nodes in float)."""
    run.int8 = run.quantize_fn(run.ranges, run.config.calibration.exclude_nodes)


def budget(run: Run) -> None:
    """With an accuracy budget: keep the most sensitive nodes in float until it holds on the held-out samples."""
    cfg = run.config
    if cfg.budget is None:
        run.parts["accuracy_budget"] = None
        return
    from ..check.budget import keep_float_until

    run.int8, run.parts["accuracy_budget"] = keep_float_until(
        cfg.budget, run.work, lambda excl: run.quantize_fn(run.ranges, excl), run.holdout,
        op_types=run.target.quantization.op_types, labels=run.labels, exclude=cfg.calibration.exclude_nodes,
        batch_size=cfg.data_options.batch_size, progress=cfg.progress)


def layers(run: Run) -> None:
    """The per-layer error table; a diagnostic, so a graph it cannot analyse costs a warning, not the bundle."""
    from tqdm import tqdm

    from ..check import layers as layer_check

    cfg = run.config
    if cfg.calibration.layer_report is False:
        return
    try:
        with tqdm(total=len(run.holdout), desc="per-layer error", unit="sample", disable=not cfg.progress,
                  leave=False) as bar:
            rows = layer_check.layer_errors(run.work, run.int8, run.holdout, batch_size=cfg.data_options.batch_size,
                                            progress=bar.update)
        run.parts["layers"] = [r.to_dict() for r in rows]
    except Exception as exc:  # onnxruntime raises its own exception types for graphs it refuses
        log.warning("per-layer error report skipped: %s: %s", type(exc).__name__, exc)


def settings(run: Run) -> None:
    """The manifest's quantization settings and the report's calibration part."""
    tgt = run.target
    run.settings = {"source": "ptq", "method": run.method, "calibration_samples": len(run.calib),
                    **tgt.to_dict()["quantization"]}
    run.parts.update(report_parts(run))
    run.parts["calibration"] = {"data": run.samples.source, "samples": len(run.calib), "tensors": len(run.ranges),
                                "float_tensors": skip_absurd_ranges(run.ranges)[1]}
