"""The post-training quantization job's own stages: fp32 passes (equalization, SmoothQuant) → calibration
(streaming observers, or the best method per tensor) → QDQ quantization (+ bias correction) → accuracy budget →
per-layer error. The order is in :mod:`edgequant.jobs`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import onnx

from ..calibration.streaming import METHODS, fixed_batch, tensors_to_calibrate
from ..calibration.streaming import calibrate as streaming_calibrate
from ..check.fidelity import fidelity
from ..check.outputs import gate_message, gross_failures
from ..errors import DataError, FidelityError
from ..frontend.torch_export import convert_opset, prepare_fp32
from ..graph.passes import (REGISTRY, BiasCorrection, Equalize, GlobalAveragePool, HardSigmoidAdd, PadDepthwise,
                            PadInput, PassRecord, PassRun, SmoothQuant, SoftmaxInnerAxis)
from ..graph.sessions import host_would_differ
from ..progress import progress_bar
from ..quantize.qdq import quantize as qdq_quantize
from ..quantize.qdq import skip_absurd_ranges
from ..transforms.algorithms import Algorithms
from .stages import Run, report_parts, to_fp32

__all__ = ["budget", "calibrate", "detection", "fp32_graph", "fp32_passes", "gate", "heads", "host_kernels", "layers",
           "prepare", "quantize", "settings"]

log = logging.getLogger(__name__)

DETECT_RUNTIME = "edgequant_detect.py"


def prepare(raw: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The exported graph → ORT's basic optimizations at the opset (the int8-friendly rewrites follow in
    :func:`fp32_graph`, as verified passes)."""
    return convert_opset(prepare_fp32(raw), opset)


def fp32_graph(run: Run) -> None:
    """The model → the fp32 reference graph, traced with a dynamic batch axis (shapes are fixed at the end), with
    the int8-friendly rewrites that every target takes (GlobalAveragePool). An .onnx whose batch axis is fixed
    runs in batches of exactly that size."""
    to_fp32(run, dynamic_batch=True, prepare=prepare)
    fixed = fixed_batch(run.fp32, run.samples.batch_axes)
    if fixed:
        run.calib, run.holdout = _fit_fixed_batch(run.calib, fixed, "calibration"), \
            _fit_fixed_batch(run.holdout, fixed, "held-out")
        run.fixed_batch = fixed
    run.fp32, _ = _pass_run(run).run(run.fp32, [GlobalAveragePool()])
    run.work = run.fp32


def _pass_run(run: Run, **kwargs: Any) -> PassRun:
    """A PassRun on the calibration samples whose records go into the report's ``passes`` part."""
    return PassRun(run.calib, batch_size=run.batch_size, fixed=bool(run.fixed_batch), on_record=_recorder(run),
                   **kwargs)


def _recorder(run: Run):
    """A PassRecord → the report's ``passes`` rows, one per pass (a later record of a pass replaces the earlier
    one), in pipeline order."""
    order = [cls.name for cls in REGISTRY]

    def note(record: PassRecord) -> None:
        rows = [r for r in run.parts.get("passes") or [] if r["name"] != record.name]
        run.parts["passes"] = sorted([*rows, record.to_dict()], key=lambda r: order.index(r["name"]))

    return note


def _fit_fixed_batch(samples: Any, fixed: int, what: str) -> Any:
    """Samples for a model whose batch is fixed at ``fixed`` → a multiple of it (the rest left out, logged)."""
    n = len(samples) - len(samples) % fixed
    if n == 0:
        raise DataError(f"the model's batch size is fixed at {fixed} but there are only {len(samples)} {what} "
                        f"samples: give at least {5 * fixed} samples, or export the model with a batch of 1 or a "
                        "dynamic batch axis")
    if n < len(samples):
        log.warning("the model's batch is fixed at %d: %d of %d %s samples left out", fixed, len(samples) - n,
                    len(samples), what)
        return samples.subset(list(range(n)))
    return samples


def fp32_passes(run: Run) -> None:
    """The fp32 rewrites that keep the function (equalization, SmoothQuant, depthwise channels padded to the
    target's kernels), each verified on calibration samples (edgequant.graph.passes) → the graph to quantize."""
    algo, q = run.config.algorithms, run.target.quantization
    report: dict[str, Any] = algo.to_dict()
    passes: list = [SoftmaxInnerAxis()] if q.softmax_inner_axis else []
    if algo.equalize:
        passes.append(Equalize())
    if algo.smooth_quant:
        passes.append(SmoothQuant(run.calib, alpha=algo.smooth_quant_alpha, batch_size=run.batch_size,
                                  limit=algo.max_samples))
    padding = bool(q.depthwise_channel_align or q.input_channel_align)
    if padding:
        passes += [PadDepthwise(q.depthwise_channel_align), PadInput(q.input_channel_align, spread=q.pair_saturation)]
    run.work, done = _pass_run(run).run(run.fp32, passes) if passes else (run.fp32, {})
    if algo.equalize:
        report["equalized_pairs"] = done.get(Equalize.name, 0)
    if algo.smooth_quant:
        report["smoothed_activations"] = done.get(SmoothQuant.name, 0)
    if q.softmax_inner_axis:
        report["softmax_inner_axis"] = done.get(SoftmaxInnerAxis.name, 0)
    if padding:
        report["padded_depthwise"] = done.get(PadDepthwise.name, [])
        report["padded_inputs"] = done.get(PadInput.name, [])
    run.parts["algorithms"] = report


def calibrate(run: Run) -> None:
    """Activation ranges on the calibration samples: one streaming pass of the chosen method, or with
    ``method="auto"`` per tensor the method with the least output error."""
    cfg, tgt = run.config, run.target
    method = run.method = cfg.calibration.method or "minmax"
    batch = run.batch_size
    tensors = tensors_to_calibrate(run.work, tgt.quantization.op_types)
    if method == "auto":
        from ..calibration.auto import auto_ranges

        work = run.work
        run.ranges, picked = auto_ranges(work, run.calib, tensors, lambda r: qdq_quantize(work, r, tgt),
                                         batch_size=batch, limit=cfg.algorithms.max_samples)
        run.parts["algorithms"]["auto_methods"] = {m: sum(v == m for v in picked.values()) for m in METHODS}
    else:
        with progress_bar(total=len(run.calib), desc=f"calibrating ({method})", unit="sample",
                          disable=not cfg.progress, leave=False) as bar:
            run.ranges = streaming_calibrate(run.work, run.calib, tensors, method=method, batch_size=batch,
                                             progress=bar.update)
    run.quantize_fn = _quantizer(run.work, tgt, cfg.algorithms, run.calib, batch, run.ranges,
                                 cfg.calibration.exclude_nodes, fixed=bool(run.fixed_batch),
                                 on_record=_recorder(run), level=run.checked.level)


def _quantizer(work: onnx.ModelProto, tgt: Any, algo: Algorithms, calib: Any, batch_size: int, ranges: dict,
               exclude_nodes: Sequence[str], fixed: bool = False, on_record: Any = None, level: str = "all"):
    """(ranges, float nodes) → int8 model, with the post-quantization rewrites applied as passes verified on the
    first int8 graph (edgequant.graph.passes; ``on_record`` gets their records, ``level`` is the arithmetic
    they are checked in). On targets whose kernels saturate u8·s8 pair sums, the weight ranges are measured once
    here on the calibration data."""
    from ..transforms.smooth import smooth_muls

    keep_float = smooth_muls(work)
    limits = None
    if tgt.quantization.pair_saturation:
        from ..quantize.saturation import weight_limits

        limits = weight_limits(work, skip_absurd_ranges(ranges)[0], calib, op_types=tgt.quantization.op_types,
                               exclude=[*exclude_nodes, *keep_float],
                               symmetric_activations=tgt.quantization.activation_symmetric,
                               **({"batch_size": batch_size} if fixed else {}))  # a fixed batch runs in no other

    passes: list = []
    if tgt.quantization.int8_hardsigmoid:
        passes.append(HardSigmoidAdd())
    if algo.bias_correction:
        passes.append(BiasCorrection(work, calib, batch_size=batch_size, limit=algo.max_samples))
    checker = PassRun(calib, batch_size=batch_size, fixed=fixed, level=level, reference=work, on_record=on_record)

    def run(ranges, exclude):
        int8 = qdq_quantize(work, ranges, tgt, exclude_nodes=[*exclude, *keep_float], limits=limits)
        return checker.run(int8, passes)[0] if passes else int8

    return run


def heads(run: Run) -> None:
    """Outputs whose final Concat mixes ranges (detection heads) → their decode tails stay float
    (edgequant.quantize.heads); the report lists them."""
    from ..quantize.heads import mixed_range_heads

    run.parts["heads"] = [h.to_dict() for h in mixed_range_heads(run.work, run.ranges)]


def _exclude(run: Run) -> list[str]:
    """``--exclude`` nodes, the detection heads' float nodes and the nodes the kernel choices keep float."""
    given = list(run.config.calibration.exclude_nodes)
    extra = [n for h in run.parts.get("heads") or [] for n in h["float_nodes"] if n not in given]
    if run.target.quantization.float_where_faster:
        extra += [n for n in run.kernel_float if n not in given and n not in extra]
    return [*given, *extra]


def quantize(run: Run) -> None:
    """Ranges → the QDQ int8 graph (the target's placement rules; ``--exclude`` nodes and head tails in float)."""
    run.int8 = run.quantize_fn(run.ranges, _exclude(run))


def detection(run: Run) -> None:
    """For a box+scores head: detection agreement of int8 with fp32 through the device's reference NMS, and that
    NMS (``edgequant_detect.py``) in the bundle."""
    from importlib import resources

    from ..check.detection import detection_agreement, detection_layout, unsupported

    heads = run.parts.get("heads") or []
    head = next((h for h in heads if detection_layout(h)), None)
    if head is None:
        run.parts["detection"] = unsupported(heads[0]) if heads else None
        return
    layout = detection_layout(head)
    run.parts["detection"] = detection_agreement(run.fp32, run.int8, run.holdout, head["output"], layout=layout,
                                                 batch_size=run.batch_size, level=run.checked.level)
    run.manifest_extra["detection"] = {"output": head["output"], "layout": layout}
    run.files[DETECT_RUNTIME] = resources.files("edgequant._runtime").joinpath(DETECT_RUNTIME).read_bytes()


def budget(run: Run) -> None:
    """With an accuracy budget: keep the most sensitive nodes in float until it holds on the held-out samples."""
    cfg = run.config
    if cfg.budget is None:
        run.parts["accuracy_budget"] = None
        return
    from ..check.budget import keep_float_until

    run.int8, run.parts["accuracy_budget"] = keep_float_until(
        cfg.budget, run.work, lambda excl: run.quantize_fn(run.ranges, excl), run.holdout,
        op_types=run.target.quantization.op_types, labels=run.labels, exclude=_exclude(run),
        batch_size=run.batch_size, progress=cfg.progress, level=run.checked.level)


def host_kernels(run: Run) -> None:
    """When this machine's own fused kernels would compute the bundle differently from the target (x86 without
    VNNI, full-range weights): the fidelity they would give and what to do about it."""
    tgt, checked = run.target, run.checked
    if not host_would_differ(tgt, checked):
        run.parts["host_kernels"] = None
        return
    fid = fidelity(run.fp32, run.int8, run.holdout, batch_size=run.batch_size,
                   level=tgt.runtime.graph_optimization_level)
    run.parts["host_kernels"] = {
        "cpu": checked.to_dict()["host_cpu_label"], "fidelity": [f.to_dict() for f in fid],
        "advice": "for x86 devices without VNNI export with --target generic-cpu (or x86-avx2); the device "
                  f"adapter refuses this {tgt.name} bundle on such CPUs"}


def layers(run: Run) -> None:
    """The per-layer table (also when the gate below fails: its message names the worst layers); a diagnostic,
    so a graph it cannot analyse costs a warning, not the bundle."""
    from ..check import layers as layer_check

    cfg = run.config
    if cfg.calibration.layer_report is False and not _failures(run):
        return
    try:
        with progress_bar(total=len(run.holdout), desc="per-layer error", unit="sample", disable=not cfg.progress,
                          leave=False) as bar:
            rows = layer_check.layer_errors(run.work, run.int8, run.holdout, batch_size=run.batch_size,
                                            progress=bar.update, level=run.checked.level)
        run.parts["layers"] = [r.to_dict() for r in rows]
    except Exception as exc:  # onnxruntime raises its own exception types for graphs it refuses
        log.warning("per-layer error report skipped: %s: %s", type(exc).__name__, exc)


def gate(run: Run) -> None:
    """A grossly wrong int8 model (check/outputs.py's floors) raises FidelityError and nothing is written, unless
    ``allow_inaccurate``: then the bundle is written and the report records the failures."""
    from ..check.advice import advise

    cfg = run.config
    failures = _failures(run)
    if failures and not cfg.calibration.allow_inaccurate:
        def requantize(extra: list[str]) -> list[dict]:
            int8 = run.quantize_fn(run.ranges, [*_exclude(run), *extra])
            return [f.to_dict() for f in fidelity(run.fp32, int8, run.holdout, batch_size=run.batch_size,
                                                  level=run.checked.level)]

        advice = advise(failures, run.parts.get("layers"), run.work, requantize)
        raise FidelityError(gate_message(failures, advice, run.method))
    if failures:
        log.warning("writing a grossly wrong int8 model (allow_inaccurate): %s %s", *failures[0])
    if cfg.calibration.layer_report is False:
        run.parts.pop("layers", None)
    run.parts["fidelity_gate"] = {"passed": not failures, "failures": [f"{w}: {why}" for w, why in failures],
                                  "overridden": bool(failures) and cfg.calibration.allow_inaccurate}


def _failures(run: Run) -> list[tuple[str, str]]:
    """The gate's failures: every output by its task metric where it has one (detection agreement included)."""
    return gross_failures(run.parts["fidelity"], run.parts.get("detection"))


def settings(run: Run) -> None:
    """The manifest's quantization settings and the report's calibration part."""
    tgt = run.target
    run.settings = {"source": "ptq", "method": run.method, "calibration_samples": len(run.calib),
                    **tgt.to_dict()["quantization"]}
    run.parts.update(report_parts(run))
    if tgt.quantization.int8_hardsigmoid:
        from ..quantize.hardsigmoid import count_int8_hardsigmoid

        run.parts["algorithms"]["int8_hardsigmoid"] = count_int8_hardsigmoid(run.int8)
    run.parts["calibration"] = {"data": run.samples.source, "samples": len(run.calib), "tensors": len(run.ranges),
                                "float_tensors": skip_absurd_ranges(run.ranges)[1]}
