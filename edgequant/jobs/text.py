"""The job for Hugging Face text encoders, one line per stage: model folder → fp32 ONNX (optimum) → text →
tokens → per-channel ranges → smoothed fp32 → QDQ (or dynamic) int8 → pooled-embedding check → bundle with
the tokenizer and ``edgequant_text.py``.

Why the recipe differs from the CNN one (measured on all-MiniLM-L6-v2, see benchmarks/minilm.py):
- Only MatMul/Gemm with constant weights are quantized. LayerNorm, Softmax and GELU have no int8 kernel on
  ONNX Runtime's CPU provider, so QDQ around them only adds conversions; the attention products (Q·Kᵀ, P·V)
  are as fast in float at encoder lengths and more accurate.
- MatMul outputs stay float (MatMulIntegerToFloat): they feed the residual stream, whose outlier channels
  8 bits cannot hold. Quantizing them drops the embedding cosine from 0.990 to 0.935.
- The MatMul inputs are smoothed (``smooth.py``) before calibration: per-tensor activation scales then fit
  every channel (cosine 0.990 → 0.998).
- Targets that must be safe on AVX2 without VNNI (``generic-cpu``) use 7-bit s8 weights, except on the
  feed-forward MatMuls, whose full-range u8 weights (``uint8_weight_nodes``) run on U8U8 kernels: cosine
  0.9963 → 0.9978 at 0.66× fp32 latency instead of 0.46×.
- ``dynamic``: ONNX Runtime's ``quantize_dynamic`` (each activation's scale computed from its range at every
  run, per-channel weights), no calibration ranges; the data only checks the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import onnx

from .. import __version__
from ..bundle.core import Bundle, check_out_dir, write_bundle
from ..calibration.streaming import METHODS, calibrate
from ..errors import CalibrationError, DataError, ExportError, QuantizationError, option
from ..frontend.torch_export import convert_opset, prepare_fp32
from ..frontend.hf import TOKENIZER_FILES, HFModel, is_hf_folder, load_hf, quiet
from ..quantize.qdq import quantize
from ..transforms.smooth import ALPHA, channel_ranges, smooth
from ..targets import Target, load_target
from ..data.text import (TextPreprocess, embedding_agreement, is_text_path, read_texts, tokenize,
                   tokenizer_manifest)
from ..check.fidelity import cpu_kernels, fidelity
from ..bundle.golden import add_selftest
from ..graph.sessions import checked_with

__all__ = ["export_text"]

log = logging.getLogger(__name__)

TEXT_RUNTIME = "edgequant_text.py"
LINEAR_OPS = ("MatMul", "Gemm")
# Sequences per calibration batch, at most: one batch of transformer activations is what calibration holds in
# memory (MiniLM at 128 tokens: peak RSS 460 MiB with 8, 539 MiB with 16, and 8 is no slower).
TEXT_BATCH = 8


def export_text(model: Any, calibration: Any, *, out: str | Path, target: str | Path | Target = "generic-cpu",
                method: str = "minmax", num_samples: int | None = None, opset: int | None = None,
                task: str = "feature-extraction", max_length: int = 128, dynamic: bool = False,
                exclude_nodes: Sequence[str] = (), batch_size: int = 16, force: bool = False,
                progress: bool = True, weights: Any = None) -> Bundle:
    """A Hugging Face model folder (or :class:`HFModel`) and text (.txt/.jsonl or a list of strings) → an int8
    bundle that carries the tokenizer. ``weights`` (a :class:`edgequant.quantize.weight_only.WeightOnly`) quantizes only the
    MatMul/Gemm weights instead (activations float; GPTQ's Hessians come from the calibration text)."""
    from .ptq import build_manifest, split_holdout

    tgt = load_target(target)
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"{option('num_samples')} must be at least 1, not {num_samples}")
    pre = TextPreprocess(max_length=max_length)
    out = Path(out)
    check_out_dir(out, force)
    _check_pairing(model, calibration)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    texts, source = _texts(calibration)
    if not isinstance(model, HFModel) and not any((Path(model) / n).is_file() for n in TOKENIZER_FILES):
        raise DataError(f"{model} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): text data feeds only "
                        "text models; pass .npy/.npz calibration data instead")
    hf = model if isinstance(model, HFModel) else load_hf(model, task=task, opset=opset or tgt.opset)
    if not hf.has_tokenizer:
        raise DataError(f"{hf.source} has no tokenizer files (tokenizer.json or vocab.txt): text data feeds only "
                        "text models; pass .npy/.npz calibration data instead")
    if hf.max_positions is not None and pre.max_length > hf.max_positions:
        raise DataError(f"{option('max_length', pre.max_length)} is longer than {hf.source} supports "
                        f"({hf.max_positions} positions); use {option('max_length', hf.max_positions)} or less")
    tokenizer = hf.tokenizer()
    fp32 = convert_opset(prepare_fp32(hf.onnx_model), opset or tgt.opset)
    inputs = _input_names(fp32)
    samples = tokenize(texts, tokenizer, inputs, pre, source=source)
    calib, holdout = split_holdout(samples, num_samples)
    timings["export_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if weights is not None:
        from ..quantize.weight_only import quantize_weights

        int8, float_tensors = quantize_weights(fp32, weights, calib if weights.method == "gptq" else None,
                                               exclude_nodes=exclude_nodes, batch_size=min(batch_size, TEXT_BATCH),
                                               progress=progress), []
    elif dynamic:
        int8, float_tensors = _dynamic(fp32, tgt, exclude_nodes), []
    else:
        tensors = _linear_inputs(fp32)
        mask = "attention_mask" if "attention_mask" in inputs else None
        stats = _channel_ranges(fp32, calib, tensors, min(batch_size, TEXT_BATCH), progress, mask)
        timings["calibrate_s"] = time.perf_counter() - t1
        smoothed, ranges = smooth(fp32, stats)
        if method != "minmax":
            ranges = calibrate(smoothed, calib, _linear_inputs(smoothed), method=method,
                               batch_size=min(batch_size, TEXT_BATCH))
            timings["calibrate_s"] = time.perf_counter() - t1
        keep_float = [*exclude_nodes, *_activation_products(smoothed)]
        float_tensors = sorted(set(_linear_inputs(smoothed)) - set(ranges))
        del stats
        # the smoothed model is handed over: quantized in place, without a further copy of its weights
        int8 = quantize(smoothed, ranges, _encoder_target(tgt), exclude_nodes=keep_float, float_outputs=LINEAR_OPS,
                        consume=True)
        del smoothed
    timings["quantize_s"] = time.perf_counter() - t1 - timings.get("calibrate_s", 0.0)

    pooling = _pooling(hf, fp32)
    kernels = cpu_kernels(int8) if tgt.runtime.cpu_int8_fusion else None
    checked = checked_with(_encoder_target(tgt))
    if pooling:
        fid = [embedding_agreement(fp32, int8, holdout, pooling, batch_size=batch_size, level=checked.level)]
    else:
        fid = [f.to_dict() for f in fidelity(fp32, int8, holdout, batch_size=batch_size, level=checked.level)]
    timings["total_s"] = time.perf_counter() - t0

    int8_bytes = int8.SerializeToString(deterministic=True)
    fp32_bytes = fp32.SerializeToString(deterministic=True)
    kind = "dynamic" if dynamic else method
    settings = {"source": "ptq-dynamic" if dynamic else "ptq", "method": kind,
                "calibration_samples": 0 if dynamic else len(calib),
                **_encoder_target(tgt).to_dict()["quantization"],
                "float_outputs": [] if dynamic else list(LINEAR_OPS), "smoothing_alpha": None if dynamic else ALPHA}
    if weights is not None:
        kind = weights.preset
        settings = {"source": "weight-only", **weights.to_dict(),
                    "calibration_samples": len(calib) if weights.method == "gptq" else 0}
    manifest = build_manifest(int8, tgt, settings, None, reference=True)
    if weights is not None:
        manifest["model"]["format"] = "onnx-weight-only"
    manifest["tokenizer"] = tokenizer_manifest(tokenizer, list(hf.tokenizer_files), inputs, pre)
    manifest["pooling"] = pooling
    manifest["source_model"] = {"kind": "huggingface", "model_type": hf.model_type, "task": hf.task}
    report = {
        "edgequant_version": __version__,
        "source": settings["source"],
        "target": tgt.name,
        "method": kind,
        "calibration": {"data": source, "samples": settings["calibration_samples"],
                        "max_length": pre.max_length, "float_tensors": float_tensors},
        "holdout": {"samples": len(holdout), "disjoint_from_calibration": len(holdout) < len(samples)},
        "sizes": {"fp32_bytes": len(fp32_bytes), "int8_bytes": len(int8_bytes),
                  "ratio": round(len(int8_bytes) / len(fp32_bytes), 4)},
        "fidelity": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in f.items()} for f in fid],
        "kernels": kernels.to_dict() if kernels else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "checked_with": checked.to_dict(),
    }
    if weights is not None:
        from ..quantize.weight_only import weight_bytes

        report["weights"] = {**weights.to_dict(), **weight_bytes(int8)}
    files = {"model.onnx": int8_bytes, "model.fp32.onnx": fp32_bytes, **hf.tokenizer_files,
             TEXT_RUNTIME: resources.files("edgequant._runtime").joinpath(TEXT_RUNTIME).read_bytes()}
    add_selftest(files, manifest, int8, holdout, level=checked.level)
    return write_bundle(out, files, manifest, report, force=force)


def _check_pairing(model: Any, calibration: Any) -> None:
    text_model = isinstance(model, HFModel) or is_hf_folder(model)
    text_data = is_text_path(calibration) or (isinstance(calibration, (list, tuple)) and calibration
                                              and all(isinstance(t, str) for t in calibration))
    if text_data and not text_model:
        raise DataError(f"text calibration data ({_name(calibration)}) feeds only Hugging Face text models; "
                        f"{_name(model)} is not a Hugging Face model folder (config.json, weights, tokenizer)")
    if not text_model and not text_data:
        raise DataError(f"dynamic int8 is for Hugging Face text encoders: pass a model folder and text data; "
                        f"{_name(model)} is not one")
    if text_model and not text_data:
        raise DataError(f"{_name(model)} is a Hugging Face model: pass text calibration data, a .txt file (one "
                        f"sample a line) or a .jsonl file, not {_name(calibration)}")


def _name(obj: Any) -> str:
    if isinstance(obj, HFModel):
        return obj.source
    return str(obj) if isinstance(obj, (str, Path)) else f"a {type(obj).__name__}"


def _texts(calibration: Any) -> tuple[list[str], str]:
    if isinstance(calibration, (str, Path)):
        return read_texts(calibration), str(calibration)
    texts = [t for t in calibration if t.strip()]
    if not texts:
        raise DataError("text calibration data is empty: pass at least one non-blank text")
    return texts, "texts"


def _input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _linear_inputs(model: onnx.ModelProto) -> list[str]:
    """Float activations multiplied by constant weights in MatMul/Gemm: the only tensors quantized here."""
    inits = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in LINEAR_OPS and len(node.input) > 1 and node.input[1] in inits:
            if node.input[0] not in inits and node.input[0] not in names:
                names.append(node.input[0])
    return names


def _activation_products(model: onnx.ModelProto) -> list[str]:
    """MatMuls of two activations (attention scores Q·Kᵀ, probabilities·V): small at encoder lengths, no faster
    in int8 on the CPU provider (measured), and more accurate in float, so they stay float."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in LINEAR_OPS and not (len(n.input) > 1 and n.input[1] in inits)]


def _encoder_target(tgt: Target) -> Target:
    q = tgt.quantization
    ops = tuple(op for op in q.op_types if op in LINEAR_OPS)
    if not ops:
        raise QuantizationError(f"target {tgt.name} quantizes none of {', '.join(LINEAR_OPS)}; a transformer "
                                "encoder needs MatMul in the profile's op_types")
    return dataclasses.replace(tgt, quantization=dataclasses.replace(q, op_types=ops))


def _channel_ranges(fp32, calib, tensors, batch_size, progress, mask):
    from ..progress import progress_bar

    with progress_bar(total=len(calib), desc="calibrating (per-channel minmax)", unit="sample", disable=not progress,
              leave=False) as bar:
        return channel_ranges(fp32, calib, tensors, batch_size=batch_size, progress=bar.update, mask_input=mask)


def _dynamic(fp32: onnx.ModelProto, tgt: Target, exclude_nodes: Sequence[str]) -> onnx.ModelProto:
    """ONNX Runtime's dynamic quantization: int8 weights (per-channel per the target), activation scales per
    run. ORT's CPU provider fuses the result into DynamicQuantizeMatMul / MatMulIntegerToFloat."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = _encoder_target(tgt).quantization
    with tempfile.TemporaryDirectory(prefix="edgequant-") as tmp:
        path = os.path.join(tmp, "dynamic.onnx")
        try:
            with quiet():
                quantize_dynamic(fp32, path, op_types_to_quantize=list(q.op_types), per_channel=q.per_channel,
                                 reduce_range=q.reduce_range, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(exclude_nodes), extra_options={"MatMulConstBOnly": True})
        except Exception as exc:
            raise QuantizationError(f"ONNX Runtime's dynamic quantizer failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(path)
    model.producer_name = "edgequant"
    keep = [p for p in model.metadata_props if not p.key.startswith("onnx.quant")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    return model


def _pooling(hf: HFModel, fp32: onnx.ModelProto) -> dict[str, Any] | None:
    if not hf.pooling or hf.task != "feature-extraction":
        return None
    outputs = [o.name for o in fp32.graph.output]
    output = "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]
    if "attention_mask" not in _input_names(fp32):
        raise ExportError(f"{hf.source}: the exported model has no attention_mask input, which pooling needs")
    return {"output": output, "mask_input": "attention_mask", **hf.pooling}
