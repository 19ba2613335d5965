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
  every channel (cosine 0.990 → 0.998). Each group's migration strength α is searched on activation rows
  kept from the calibration pass (``alpha="auto"``), with the weights modelled at the width the target gives
  them: one α for all is 0.9979, per-group α 0.9983.
- Targets that must be safe on AVX2 without VNNI (``generic-cpu``) narrow s8 weight channels towards 7 bits
  where their pair sums could saturate (``pair_saturation``); every MatMul stays on the fast U8S8 kernels
  (0.48× fp32 latency; full-range u8 feed-forward weights on U8U8 kernels were 0.64× for +0.0001 cosine).
- Q/K/V merged into one MatMul (``concat_linear.py``, exact in float: one quantized input and one GEMM three times
  as wide per layer, the same cosine) is a kernel choice, ``merge_qkv``: where this machine computes the target's
  kernels both int8 graphs are built and timed at batch 1 (edgequant.check.kernel_choices.decide) and the merge is
  kept only where it pays; elsewhere the three MatMuls stay. On an idle machine it did not pay on MiniLM
  (seq 128: 0.538× against 0.519× fp32 with VNNI, 0.670× against 0.657× on AVX2).
- ``dynamic``: ONNX Runtime's ``quantize_dynamic`` (each activation's scale computed from its range at every
  run, per-channel weights), no calibration ranges; the data only checks the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import onnx

from ..calibration.streaming import calibrate
from ..check.fidelity import fidelity
from ..data.holdout import split_holdout
from ..data.text import TextPreprocess, embedding_agreement, is_text_path, read_texts, tokenize, tokenizer_manifest
from ..errors import DataError, ExportError, QuantizationError, option
from ..frontend.hf import TOKENIZER_FILES, HFModel, is_hf_folder, load_hf, quiet
from ..frontend.torch_export import convert_opset, prepare_fp32
from ..graph.sessions import checked_with
from ..progress import progress_bar
from ..quantize.qdq import quantize as qdq_quantize
from ..targets import Target
from ..transforms.concat_linear import concat_linear
from ..transforms.smooth import channel_stats, smooth_graph
from .stages import Run, report_parts

__all__ = ["activation_products", "check", "dynamic_int8", "encoder_target", "input_names", "linear_inputs", "load",
           "quantize", "settings", "text_channel_ranges"]

log = logging.getLogger(__name__)

TEXT_RUNTIME = "edgequant_text.py"
LINEAR_OPS = ("MatMul", "Gemm")
# Sequences per calibration batch, at most: one batch of transformer activations is what calibration holds in
# memory (MiniLM at 128 tokens: peak RSS 460 MiB with 8, 539 MiB with 16, and 8 is no slower).
TEXT_BATCH = 8


def load(run: Run) -> None:
    """Text and a Hugging Face model folder → the fp32 graph (optimum's export), tokenized samples, their split."""
    cfg = run.config
    model, calibration = cfg.model, cfg.data
    pre = TextPreprocess(max_length=cfg.text.max_length or 128)
    _check_pairing(model, calibration)
    texts, source = _texts(calibration)
    if not isinstance(model, HFModel) and not any((Path(model) / n).is_file() for n in TOKENIZER_FILES):
        raise DataError(f"{model} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): text data feeds only "
                        "text models; pass .npy/.npz calibration data instead")
    hf = model if isinstance(model, HFModel) else load_hf(model, task=cfg.text.task or "feature-extraction",
                                                          opset=run.opset)
    if not hf.has_tokenizer:
        raise DataError(f"{hf.source} has no tokenizer files (tokenizer.json or vocab.txt): text data feeds only "
                        "text models; pass .npy/.npz calibration data instead")
    if hf.max_positions is not None and pre.max_length > hf.max_positions:
        raise DataError(f"{option('max_length', pre.max_length)} is longer than {hf.source} supports "
                        f"({hf.max_positions} positions); use {option('max_length', hf.max_positions)} or less")
    tokenizer = hf.tokenizer()
    run.loaded = hf
    run.fp32 = run.work = convert_opset(prepare_fp32(hf.onnx_model), run.opset)
    inputs = input_names(run.fp32)
    run.samples = tokenize(texts, tokenizer, inputs, pre, source=source)
    run.calib, run.holdout = split_holdout(run.samples, cfg.data_options.num_samples)
    run.manifest_extra["tokenizer"] = tokenizer_manifest(tokenizer, list(hf.tokenizer_files), inputs, pre)
    run.manifest_extra["source_model"] = {"kind": "huggingface", "model_type": hf.model_type, "task": hf.task}
    run.parts["calibration"] = {"data": source, "max_length": pre.max_length}
    run.checked = checked_with(encoder_target(run.target))  # the encoder's own op types decide the arithmetic


def quantize(run: Run) -> None:
    """The fp32 encoder → weight-only, dynamic, or smoothed static int8 (see the module docstring)."""
    cfg, tgt = run.config, run.target
    weights = cfg.weights.config()
    exclude_nodes = cfg.calibration.exclude_nodes
    batch_size = run.batch_size
    fp32, calib = run.fp32, run.calib
    if weights is not None:
        from ..quantize.weight_only import quantize_weights

        int8 = quantize_weights(fp32, weights, calib if weights.method == "gptq" else None,
                                exclude_nodes=exclude_nodes, batch_size=min(batch_size, TEXT_BATCH),
                                progress=cfg.progress)
        float_tensors = []
    elif cfg.text.dynamic:
        int8, float_tensors = dynamic_int8(fp32, tgt, exclude_nodes), []
    else:
        int8, float_tensors, alphas = _static(run, fp32)
        merged_fp32, merged = concat_linear(fp32)  # Q/K/V → one MatMul: one quantized input, one wider GEMM
        run.parts["calibration"]["merged_matmuls"] = 0
        if merged and run.checked.arithmetic == "host-kernels":  # elsewhere unmeasured: the three MatMuls stay
            choice = _merge_choice(run, int8, merged_fp32)
            if choice is not None:
                int8, float_tensors, alphas = choice
                run.parts["calibration"]["merged_matmuls"] = merged
        run.parts["calibration"]["smoothing_alphas"] = _alpha_summary(alphas)
    run.int8 = int8
    run.parts["calibration"]["float_tensors"] = float_tensors


def _static(run: Run, fp32: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], dict]:
    """fp32 → (smoothed static int8, the linear inputs left float, the smoothing strengths)."""
    cfg, tgt, calib = run.config, run.target, run.calib
    method, batch = cfg.calibration.method or "minmax", min(run.batch_size, TEXT_BATCH)
    mask = "attention_mask" if "attention_mask" in input_names(fp32) else None
    stats, rows = text_channel_ranges(fp32, calib, linear_inputs(fp32), batch, cfg.progress, mask)
    q = encoder_target(tgt).quantization
    smoothed, ranges, _, alphas = smooth_graph(fp32, stats, alpha="auto", rows=rows,
                                               weight_levels=64 if q.reduce_range or q.pair_saturation else 127)
    del rows, stats
    if method != "minmax":
        ranges = calibrate(smoothed, calib, linear_inputs(smoothed), method=method, batch_size=batch)
    keep_float = [*cfg.calibration.exclude_nodes, *activation_products(smoothed)]
    float_tensors = sorted(set(linear_inputs(smoothed)) - set(ranges))
    # the smoothed model is handed over: quantized in place, without a further copy of its weights
    int8 = qdq_quantize(smoothed, ranges, encoder_target(tgt), exclude_nodes=keep_float, float_outputs=LINEAR_OPS,
                        consume=True)
    return int8, float_tensors, alphas


def _merge_choice(run: Run, separate: onnx.ModelProto, merged_fp32: onnx.ModelProto):
    """The int8 encoder with Q/K/V separate, and the fp32 graph with them merged → the merged int8 result where it
    is faster at batch 1 on this machine beyond the noise (the report's ``kernel_choices``), else None."""
    import time

    from ..check.kernel_choices import PLAIN, decide
    from .choices import batch_one, timer_for

    t0 = time.perf_counter()
    merged = _static(run, merged_fp32)
    result = decide({PLAIN: separate, "merge_qkv": merged[0]}, batch_one(run),
                    timer=timer_for(encoder_target(run.target).runtime), build=lambda keys: merged[0],
                    host_cpu=run.checked.to_dict()["host_cpu_label"])
    result = dataclasses.replace(result, seconds=time.perf_counter() - t0)
    run.parts["kernel_choices"] = result.to_dict()
    log.info("Q/K/V merge: %s", result.decisions[0].why)
    return merged if result.kept else None


def check(run: Run) -> None:
    """The int8 encoder against fp32 on the held-out texts: pooled-embedding agreement where the model pools
    (sentence-transformers), else per output."""
    hf = run.loaded
    batch_size = run.batch_size
    pooling = _pooling(hf, run.fp32)
    run.manifest_extra["pooling"] = pooling
    if pooling:
        fid = [embedding_agreement(run.fp32, run.int8, run.holdout, pooling, batch_size=batch_size,
                                   level=run.checked.level)]
    else:
        fid = [f.to_dict() for f in fidelity(run.fp32, run.int8, run.holdout, batch_size=batch_size,
                                             level=run.checked.level)]
    run.parts["fidelity"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in f.items()} for f in fid]


def settings(run: Run) -> None:
    """The manifest's quantization settings, the report's calibration and weight parts, the tokenizer files."""
    cfg, tgt = run.config, run.target
    weights = cfg.weights.config()
    dynamic = cfg.text.dynamic
    method = cfg.calibration.method or "minmax"
    run.method = "dynamic" if dynamic else method
    run.settings = {"source": "ptq-dynamic" if dynamic else "ptq", "method": run.method,
                    "calibration_samples": 0 if dynamic else len(run.calib),
                    **encoder_target(tgt).to_dict()["quantization"],
                    "float_outputs": [] if dynamic else list(LINEAR_OPS), "smoothing_alpha": None if dynamic else "auto"}
    if weights is not None:
        from ..quantize.weight_only import weight_bytes

        run.method = weights.preset
        run.settings = {"source": "weight-only", **weights.to_dict(),
                        "calibration_samples": len(run.calib) if weights.method == "gptq" else 0}
        run.model_format = "onnx-weight-only"
        run.parts["weights"] = {**weights.to_dict(), **weight_bytes(run.int8)}
    calib = run.parts["calibration"]
    run.parts["calibration"] = {"data": calib["data"], "samples": run.settings["calibration_samples"],
                                "max_length": calib["max_length"], "float_tensors": calib["float_tensors"],
                                **{k: calib[k] for k in ("smoothing_alphas", "merged_matmuls") if k in calib}}
    run.parts.update(report_parts(run))
    run.files.update(run.loaded.tokenizer_files)
    run.files[TEXT_RUNTIME] = resources.files("edgequant._runtime").joinpath(TEXT_RUNTIME).read_bytes()


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


def input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def linear_inputs(model: onnx.ModelProto) -> list[str]:
    """Float activations multiplied by constant weights in MatMul/Gemm: the only tensors quantized here."""
    inits = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in LINEAR_OPS and len(node.input) > 1 and node.input[1] in inits:
            if node.input[0] not in inits and node.input[0] not in names:
                names.append(node.input[0])
    return names


def activation_products(model: onnx.ModelProto) -> list[str]:
    """MatMuls of two activations (attention scores Q·Kᵀ, probabilities·V): small at encoder lengths, no faster
    in int8 on the CPU provider (measured), and more accurate in float, so they stay float."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in LINEAR_OPS and not (len(n.input) > 1 and n.input[1] in inits)]


def encoder_target(tgt: Target) -> Target:
    q = tgt.quantization
    ops = tuple(op for op in q.op_types if op in LINEAR_OPS)
    if not ops:
        raise QuantizationError(f"target {tgt.name} quantizes none of {', '.join(LINEAR_OPS)}; a transformer "
                                "encoder needs MatMul in the profile's op_types")
    return dataclasses.replace(tgt, quantization=dataclasses.replace(q, op_types=ops))


def text_channel_ranges(fp32, calib, tensors, batch_size, progress, mask):
    """Per-channel ranges of ``tensors`` on the calibration texts, and activation rows for the α search."""
    with progress_bar(total=len(calib), desc="calibrating (per-channel minmax)", unit="sample",
                      disable=not progress, leave=False) as bar:
        return channel_stats(fp32, calib, tensors, batch_size=batch_size, progress=bar.update, mask_input=mask)


def _alpha_summary(alphas: dict[str, float]) -> dict[str, object]:
    """The α chosen per smoothed group → a count per value (the report's smoothing_alphas)."""
    values = sorted(alphas.values())
    return {"groups": len(values), "counts": {f"{a:.2f}": values.count(a) for a in sorted(set(values))}}


def dynamic_int8(fp32: onnx.ModelProto, tgt: Target, exclude_nodes: Sequence[str]) -> onnx.ModelProto:
    """ONNX Runtime's dynamic quantization: int8 weights (per-channel per the target), activation scales per
    run. ORT's CPU provider fuses the result into DynamicQuantizeMatMul / MatMulIntegerToFloat."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = encoder_target(tgt).quantization
    with tempfile.TemporaryDirectory(prefix="edgequant-") as tmp:
        path = os.path.join(tmp, "dynamic.onnx")
        try:
            with quiet():
                quantize_dynamic(fp32, path, op_types_to_quantize=list(q.op_types), per_channel=q.per_channel,
                                 reduce_range=q.reduce_range or q.pair_saturation, weight_type=QuantType.QInt8,
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
    if "attention_mask" not in input_names(fp32):
        raise ExportError(f"{hf.source}: the exported model has no attention_mask input, which pooling needs")
    return {"output": output, "mask_input": "attention_mask", **hf.pooling}
