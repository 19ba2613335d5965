"""The main job, one line per stage: model → fp32 ONNX → ranges → QDQ ONNX → check → bundle."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import __version__
from ..transforms.algorithms import Algorithms
from ..bundle.core import Bundle, check_out_dir, write_bundle
from ..bundle.golden import add_selftest
from ..calibration.streaming import METHODS, calibrate, fixed_batch, tensors_to_calibrate
from ..data.samples import ImagePreprocess, Samples, channel_fix, image_mismatch, load_samples
from ..errors import CalibrationError, DataError, ExportError, FidelityError, option
from ..frontend.torch_export import convert_opset, input_names_of, load_model, prepare_fp32, to_onnx
from ..quantize.qdq import quantize, skip_absurd_ranges
from ..graph.rewrite import rewrite_for_int8
from ..frontend.shapes import fix_input_shapes, resolve_input_shapes
from ..targets import Target, load_target
from ..check.fidelity import cpu_kernels, fidelity
from ..graph.sessions import checked_with, host_would_differ
from ..check.outputs import gate_message, gross_failures
from ..quantize.weight_only import check_options, export_weight_only

__all__ = ["export", "split_holdout"]

log = logging.getLogger(__name__)

MAX_HOLDOUT = 1000


def export(model: Any, calibration: Any, *, out: str | Path, target: str | Path | Target = "generic-cpu",
           method: str = "minmax", num_samples: int | None = None, opset: int | None = None,
           preprocess: ImagePreprocess | None = None, exclude_nodes: Sequence[str] = (), batch_size: int = 16,
           force: bool = False, progress: bool = True, layer_report: bool = True,
           input_shapes: Mapping[str, Sequence[int]] | None = None, task: str = "feature-extraction",
           max_length: int = 128, dynamic: bool = False, weights: str | None = None,
           block_size: int | None = None, algorithms: Algorithms | None = None, accuracy_budget: Any = None,
           labels: Any = None, allow_inaccurate: bool = False) -> Bundle:
    """A model (``file.py:factory``, ``module:factory``, ``.onnx`` or ``nn.Module``) and calibration samples
    (a folder, a .npy/.npz file or an iterable of arrays/dicts) → an int8 bundle written to ``out``.

    With ``layer_report``, the report also has the per-layer error table, plot and HTML page (layers.py).
    Targets with ``static_shapes`` (and any export given ``input_shapes``, {input: shape with batch axis}; key
    "" for the only input) get fixed input shapes, by default batch 1 and the data's shape.
    A Hugging Face model folder takes text (.txt/.jsonl): see :func:`edgequant.jobs.text.export_text`; a
    decoder (``--task text-generation-with-past``, or a causal LM's folder) goes to
    :func:`edgequant.jobs.decoder.export_decoder` and needs ``weights``.
    ``weights`` (``q8``, ``q4``, ``q4-gptq``) quantizes only the MatMul/Gemm weights, in blocks of
    ``block_size`` (default 32), and keeps activations in float (see ``edgequant.quantize.weight_only``).
    ``algorithms`` turns on equalization, SmoothQuant, bias correction; ``method="auto"`` picks a method per
    tensor; ``accuracy_budget`` (an AccuracyBudget or ``"cosine>=0.995"``) keeps the most sensitive nodes in
    float until it holds on the held-out samples; ``labels`` (array or .npy, one per sample) serve top1 budgets.
    A grossly wrong int8 model (check/outputs.py's floors) raises FidelityError and writes nothing, unless
    ``allow_inaccurate``: then the bundle is written and the report records the failures."""
    from ..check.budget import AccuracyBudget

    wo = check_options(weights=weights, block_size=block_size, method_given=method != "minmax",
                       num_samples=num_samples, dynamic=dynamic)
    if _is_decoder_job(model, task):
        from .decoder import export_decoder

        if dynamic:
            raise ExportError(f"{model} is a decoder (text generation): its bundle quantizes weights only; use "
                              "--weights q8, q4 or q4-gptq instead of --dynamic")
        return export_decoder(model, calibration, out=out, weights=wo, target=target, num_samples=num_samples,
                              opset=opset, exclude_nodes=exclude_nodes, force=force, progress=progress)
    if _is_text_job(model, calibration) or dynamic:
        from .text import export_text

        return export_text(model, calibration, out=out, target=target, method=method, num_samples=num_samples,
                           opset=opset, task=task, max_length=max_length, dynamic=dynamic,
                           exclude_nodes=exclude_nodes, batch_size=batch_size, force=force, progress=progress,
                           weights=wo)
    if wo is not None:
        return export_weight_only(model, calibration, out=out, target=target, config=wo, num_samples=num_samples,
                                  opset=opset, preprocess=preprocess, exclude_nodes=exclude_nodes,
                                  batch_size=batch_size, force=force, progress=progress)
    tgt = load_target(target)
    budget = AccuracyBudget.parse(accuracy_budget) if isinstance(accuracy_budget, str) else accuracy_budget
    algo = algorithms or Algorithms()
    if method not in METHODS and method != "auto":
        raise CalibrationError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}, auto")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"{option('num_samples')} must be at least 1, not {num_samples}")
    out = Path(out)
    check_out_dir(out, force)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    samples = load_samples(calibration, preprocess=preprocess)
    held_labels = _budget_labels(budget, labels, len(samples))
    loaded = load_model(model)
    samples = samples.bind(input_names_of(loaded))
    calib, holdout = split_holdout(samples, num_samples)
    fp32_raw = _to_onnx(loaded, samples, opset or tgt.opset, True)
    timings["export_s"] = time.perf_counter() - t0

    fp32 = convert_opset(rewrite_for_int8(prepare_fp32(fp32_raw)), opset or tgt.opset)
    _check_data_fits(fp32, samples)
    fixed = fixed_batch(fp32)
    if fixed:
        calib, holdout = _fit_fixed_batch(calib, fixed, "calibration"), _fit_fixed_batch(holdout, fixed, "held-out")
        batch_size = fixed
    shapes = resolve_input_shapes(fp32, samples[0], input_shapes) if tgt.runtime.static_shapes or input_shapes \
        else None
    t1 = time.perf_counter()
    work, algo_report = _apply_fp32_algorithms(fp32, calib, algo, batch_size)
    tensors = tensors_to_calibrate(work, tgt.quantization.op_types)
    if method == "auto":
        from ..transforms.algorithms import auto_ranges

        ranges, picked = auto_ranges(work, calib, tensors, lambda r: quantize(work, r, tgt), batch_size=batch_size,
                                     limit=algo.max_samples)
        algo_report["auto_methods"] = {m: sum(v == m for v in picked.values()) for m in METHODS}
    else:
        ranges = _calibrate(work, calib, tensors, method, batch_size, progress)
    quantize_fn = _quantizer(work, tgt, algo, calib, batch_size, ranges, exclude_nodes)
    timings["calibrate_s"] = time.perf_counter() - t1

    int8 = quantize_fn(ranges, exclude_nodes)
    checked = checked_with(tgt)  # every int8 figure below in the target's arithmetic
    budget_report = None
    if budget is not None:
        from ..check.budget import keep_float_until

        int8, budget_report = keep_float_until(
            budget, work, lambda excl: quantize_fn(ranges, excl), holdout, op_types=tgt.quantization.op_types,
            labels=held_labels, exclude=exclude_nodes, batch_size=batch_size, progress=progress, level=checked.level)
    fid = fidelity(fp32, int8, holdout, batch_size=batch_size, level=checked.level)
    host_kernels = host_kernels_report(fp32, int8, holdout, tgt, checked, batch_size)
    t2 = time.perf_counter()
    failures = gross_failures([f.to_dict() for f in fid])
    layers = _layers(work, int8, holdout, batch_size, progress, checked.level) if layer_report or failures else None
    timings["layers_s"] = time.perf_counter() - t2
    if failures and not allow_inaccurate:
        raise FidelityError(gate_message(failures, layers, fp32, method))
    if failures:
        log.warning("writing a grossly wrong int8 model (allow_inaccurate): %s %s", *failures[0])
    if not layer_report:
        layers = None
    if shapes:
        fp32, int8 = fix_input_shapes(fp32, shapes), fix_input_shapes(int8, shapes)
    kernels = cpu_kernels(int8) if tgt.runtime.cpu_int8_fusion else None
    timings["total_s"] = time.perf_counter() - t0

    int8_bytes = int8.SerializeToString(deterministic=True)
    fp32_bytes = fp32.SerializeToString(deterministic=True)
    settings = {"source": "ptq", "method": method, "calibration_samples": len(calib), **tgt.to_dict()["quantization"]}
    manifest = build_manifest(int8, tgt, settings, samples.preprocess, reference=True)
    report = {
        "edgequant_version": __version__,
        "source": "ptq",
        "target": tgt.name,
        "method": method,
        "calibration": {"data": samples.source, "samples": len(calib), "tensors": len(ranges),
                        "float_tensors": skip_absurd_ranges(ranges)[1]},
        "holdout": {"samples": len(holdout), "disjoint_from_calibration": len(holdout) < len(samples)
                    and not set(_ids(holdout)) & set(_ids(calib))},
        "sizes": {"fp32_bytes": len(fp32_bytes), "int8_bytes": len(int8_bytes),
                  "ratio": round(len(int8_bytes) / len(fp32_bytes), 4)},
        "fidelity": [f.to_dict() for f in fid],
        "checked_with": checked.to_dict(),
        "host_kernels": host_kernels,
        "kernels": kernels.to_dict() if kernels else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "algorithms": algo_report,
        "accuracy_budget": budget_report,
        "fidelity_gate": {"passed": not failures, "failures": [f"{w}: {why}" for w, why in failures],
                          "overridden": bool(failures) and allow_inaccurate},
    }
    files = {"model.onnx": int8_bytes, "model.fp32.onnx": fp32_bytes}
    add_selftest(files, manifest, int8, holdout, level=checked.level)
    if layers is not None:
        report["layers"] = layers
        files.update(_report_pages(report))
    return write_bundle(out, files, manifest, report, force=force)


def _is_decoder_job(model: Any, task: str) -> bool:
    """A decoder for text generation: asked for with the task, or the folder's config names a causal LM."""
    from ..frontend.hf import DECODER_TASKS, is_causal_lm, is_hf_folder

    return is_hf_folder(model) and (task in DECODER_TASKS or (task == "feature-extraction" and is_causal_lm(model)))


def _is_text_job(model: Any, calibration: Any) -> bool:
    from ..frontend.hf import HFModel, is_hf_folder
    from ..data.text import is_text_path

    texts = isinstance(calibration, (list, tuple)) and bool(calibration) and all(
        isinstance(t, str) for t in calibration)
    return isinstance(model, HFModel) or is_hf_folder(model) or is_text_path(calibration) or texts


def split_holdout(samples: Samples, num_samples: int | None) -> tuple[Samples, Samples]:
    """Every 5th sample (at most 1,000) is held out for checking; calibration uses the rest (first N of them).
    With fewer than 5 samples there is nothing to spare: both use all samples."""
    n = len(samples)
    if n < 5:
        return samples, samples
    held = holdout_indices(n)
    held_set = set(held)
    calib = [i for i in range(n) if i not in held_set]
    if num_samples is not None:
        calib = calib[:num_samples]
    return samples.subset(calib), samples.subset(held)


def holdout_indices(n: int) -> list[int]:
    """Indices of the held-out samples among ``n`` (all of them when fewer than 5)."""
    return list(range(n)) if n < 5 else [i for i in range(n) if i % 5 == 4][:MAX_HOLDOUT]


def _budget_labels(budget: Any, labels: Any, n: int):
    """The held-out samples' labels, checked before any work is done."""
    from ..check.budget import labels_for
    from ..errors import BudgetError

    if budget is not None and budget.needs_labels and labels is None:
        raise BudgetError(f"accuracy budget {budget} needs labels: pass {option('labels', 'labels.npy')} (one "
                          "integer class per calibration sample, in the order the samples are read)")
    return labels_for(labels, n, holdout_indices(n)) if budget is not None else None


def _apply_fp32_algorithms(fp32: onnx.ModelProto, calib: Samples, algo: Algorithms,
                           batch_size: int) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The fp32 rewrites that keep the function (equalization, SmoothQuant) → the graph to quantize."""
    from ..transforms.algorithms import equalize_cross_layer, smooth_quant

    report: dict[str, Any] = algo.to_dict()
    work = fp32
    if algo.equalize:
        work, report["equalized_pairs"] = equalize_cross_layer(work)
    if algo.smooth_quant:
        work, report["smoothed_activations"] = smooth_quant(work, calib, alpha=algo.smooth_quant_alpha,
                                                            batch_size=batch_size, limit=algo.max_samples)
    return work, report


def _quantizer(work: onnx.ModelProto, tgt: Target, algo: Algorithms, calib: Samples, batch_size: int,
               ranges: dict, exclude_nodes: Sequence[str]):
    """(ranges, float nodes) → int8 model, with the post-quantization algorithms applied. On targets whose
    kernels saturate u8·s8 pair sums, the weight ranges are measured once here on the calibration data."""
    from ..transforms.algorithms import correct_bias
    from ..transforms.smooth import smooth_muls

    keep_float = smooth_muls(work)
    limits = None
    if tgt.quantization.pair_saturation:
        from ..quantize.saturation import weight_limits

        fixed = fixed_batch(work)
        limits = weight_limits(work, skip_absurd_ranges(ranges)[0], calib, op_types=tgt.quantization.op_types,
                               exclude=[*exclude_nodes, *keep_float],
                               symmetric_activations=tgt.quantization.activation_symmetric,
                               batch_size=fixed or min(batch_size, 4))

    def run(ranges, exclude):
        int8 = quantize(work, ranges, tgt, exclude_nodes=[*exclude, *keep_float], limits=limits)
        if algo.bias_correction:
            int8, _ = correct_bias(work, int8, calib, batch_size=batch_size, limit=algo.max_samples)
        return int8

    return run


def _ids(samples: Samples) -> list[str]:
    return [samples.label(i) for i in range(len(samples))]


def _to_onnx(loaded: Any, samples: Samples, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    if isinstance(loaded, onnx.ModelProto):
        return loaded
    example = samples[0]
    try:
        return to_onnx(loaded, example, opset=opset, dynamic_batch=dynamic_batch)
    except ExportError as exc:
        mismatch = image_mismatch(samples, str(exc))
        if mismatch is not None:
            raise mismatch from None
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in example.items())
        raise ExportError(f"{exc} (inputs from the data, without batch axis: {shapes})") from exc.__cause__


def _fit_fixed_batch(samples: Samples, fixed: int, what: str) -> Samples:
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


def _check_data_fits(model: onnx.ModelProto, samples: Samples) -> None:
    """Each sample's shape must match the graph input (batch axis excluded)."""
    example = samples[0]
    for inp in model.graph.input:
        if inp.name not in example:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim][1:]
        shape = list(example[inp.name].shape)
        if len(dims) != len(shape) or any(d is not None and d != s for d, s in zip(dims, shape)):
            want = ["?" if d is None else d for d in dims]
            pre = samples.preprocess
            if pre is not None and len(dims) == 3 and len(shape) == 3:
                axis = 0 if pre.layout == "nchw" else 2
                fix = channel_fix(pre, shape[axis], dims[axis]) if dims[axis] is not None else None
                if fix is not None:
                    raise DataError(f"{samples.source}: the images become inputs of shape {shape} "
                                    f"({pre.channel_order}, {pre.layout}), but the model expects {want}: pass {fix}")
            raise DataError(f"{samples.label(0)}: input {inp.name!r} has shape {shape} but the model expects "
                            f"{want} (without batch axis); fix the data or its pre-processing")


def _calibrate(fp32, calib, tensors, method, batch_size, progress):
    from ..progress import progress_bar

    with progress_bar(total=len(calib), desc=f"calibrating ({method})", unit="sample", disable=not progress,
              leave=False) as bar:
        ranges = calibrate(fp32, calib, tensors, method=method, batch_size=batch_size, progress=bar.update)
    return ranges


def host_kernels_report(fp32: onnx.ModelProto, int8: onnx.ModelProto, holdout: Samples, tgt: Target, checked: Any,
                        batch_size: int) -> dict[str, Any] | None:
    """When this machine's own fused kernels would compute the bundle differently from the target (x86 without
    VNNI, full-range weights), the fidelity they would give and what to do about it; None otherwise."""
    if not host_would_differ(tgt, checked):
        return None
    fid = fidelity(fp32, int8, holdout, batch_size=batch_size, level=tgt.runtime.graph_optimization_level)
    return {"cpu": checked.to_dict()["host_cpu_label"], "fidelity": [f.to_dict() for f in fid],
            "advice": "for x86 devices without VNNI export with --target generic-cpu (or x86-avx2); the device "
                      f"adapter refuses this {tgt.name} bundle on such CPUs"}


def _layers(fp32, int8, holdout, batch_size, progress, level="all") -> list[dict] | None:
    """The per-layer table; a diagnostic, so a graph it cannot analyse costs a warning, not the bundle."""
    from ..progress import progress_bar

    from ..check.layers import layer_errors

    try:
        with progress_bar(total=len(holdout), desc="per-layer error", unit="sample", disable=not progress,
                  leave=False) as bar:
            rows = layer_errors(fp32, int8, holdout, batch_size=batch_size, progress=bar.update, level=level)
    except Exception as exc:  # onnxruntime raises its own exception types for graphs it refuses
        log.warning("per-layer error report skipped: %s: %s", type(exc).__name__, exc)
        return None
    return [r.to_dict() for r in rows]


def _report_pages(report: dict[str, Any]) -> dict[str, bytes]:
    """report.json's layer table → {"layers.png": plot (when matplotlib is there), "report.html": page}."""
    from ..bundle.render import layers_png, report_html

    png = layers_png(report["layers"])
    files = {"report.html": report_html(report, png).encode("utf-8")}
    if png is not None:
        files["layers.png"] = png
    return files


def build_manifest(model: onnx.ModelProto, target: Target, quantization: dict[str, Any],
                   preprocess: ImagePreprocess | None, *, reference: bool) -> dict[str, Any]:
    """The device contract (schema in runtimes/README.md), without the file checksums the writer adds."""
    from ..bundle.core import SCHEMA_VERSION

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    pre = None
    if preprocess is not None:
        inputs = [i.name for i in graph.input if i.name not in inits]
        pre = {"input": inputs[0], **preprocess.to_dict()}
    tdict = target.to_dict()
    manifest = {
        "schema": "edgequant.bundle",
        "schema_version": SCHEMA_VERSION,
        "producer": f"edgequant {__version__}",
        "model": {"file": "model.onnx", "format": "onnx-qdq", "opset": _opset(model)},
        "reference_model": {"file": "model.fp32.onnx", "format": "onnx-fp32"} if reference else None,
        "inputs": [_io(v) for v in graph.input if v.name not in inits],
        "outputs": [_io(v) for v in graph.output],
        "preprocess": pre,
        "quantization": quantization,
        "target": {"name": target.name, "description": target.description},
        "runtime": tdict["runtime"],
    }
    quantized_activations = any(n.op_type == "QuantizeLinear" for n in graph.node)
    if quantized_activations and target.full_range_weights and target.runtime.cpu_int8_fusion:
        from .._runtime.edgequant_runtime import VNNI_FLAGS

        manifest["requires_cpu"] = {"x86_64_one_of": list(VNNI_FLAGS)}
    return manifest


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _io(value: onnx.ValueInfoProto) -> dict[str, Any]:
    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
