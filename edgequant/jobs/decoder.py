"""The job for decoder-only Hugging Face language models (GPT-2, Llama, Qwen, ... ``...ForCausalLM``), one line
per stage: model folder → fp32 ONNX with a key/value cache (optimum's ``text-generation-with-past``) → text →
tokens → weight-only q8/q4/q4-gptq (MatMulNBits) → check against fp32 on held-out text (perplexity, KL,
greedy generation with the device's own generator) → bundle with the tokenizer and ``edgequant_generate.py``.

Why weight-only: decoding one token multiplies a single activation row by every weight matrix, so the time
goes into reading weights from memory; 4-bit blocks read about a sixth of float32's bytes (and static int8
activations would need ranges that hold for every token). The activations are quantized on the fly, per block
of ``block_size`` values, inside ``MatMulNBits`` (``accuracy_level`` 4), ONNX Runtime's fast path for these
weights. Why the cache graph only:
optimum's merged graph takes an empty cache on the first step, so one model serves the prompt and every
token after it (no second graph in memory).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..bundle.core import Bundle, check_out_dir, write_bundle
from ..bundle.manifest import build_manifest
from ..bundle.report import new_report, sizes_block
from ..check.generation import decoder_agreement
from ..data.text import read_texts
from ..errors import DataError, ExportError, QuantizationError
from ..frontend.hf import load_hf, read_decoder_config
from ..frontend.torch_export import convert_opset, prepare_fp32
from ..quantize.weight_only import WeightOnly, quantize_weights, weight_bytes
from ..targets import load_target

__all__ = ["export_decoder", "first_step_sample", "export_stage", "generation_spec"]

log = logging.getLogger(__name__)

GENERATE_RUNTIME = "edgequant_generate.py"
TASK = "text-generation-with-past"
CACHE_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
MAX_CHECK_TEXTS = 16  # held-out texts the check generates from (each greedy run is new_tokens steps × 2 models)
# MatMulNBits multiplies int8 activation blocks by the 4/8-bit weights (accuracy_level 4): on this VNNI host a
# 125 M-parameter decoder decodes q4 at 2× fp32's tokens/s with it, and q8 at a tenth of fp32's without it.
ACCURACY_LEVEL = 4
HF_DEFAULTS = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def export_decoder(model: str | Path, calibration: Any, *, out: str | Path, weights: WeightOnly,
                   target: Any = "generic-cpu", num_samples: int | None = None, opset: int | None = None,
                   exclude_nodes: Sequence[str] = (), force: bool = False, progress: bool = True,
                   check_tokens: int = 32) -> Bundle:
    """A decoder's model folder (config.json, generation_config.json, weights, tokenizer) + text (.txt/.jsonl
    or a list of strings: GPTQ's data and the held-out check) → a weight-only bundle that generates text."""
    if weights is None:
        raise QuantizationError(f"{model} is a decoder (text generation): its bundle quantizes weights only; add "
                                "--weights q8, q4 or q4-gptq")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"--num-samples must be at least 1, not {num_samples}")
    tgt = load_target(target)
    out = Path(out)
    check_out_dir(out, force)
    config, gen_config = read_decoder_config(model)
    texts, source = _texts(calibration)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    hf = load_hf(model, task=TASK, opset=opset or tgt.opset)
    if not hf.has_tokenizer:
        raise ExportError(f"{model}: no tokenizer.json could be made from its tokenizer files; save the tokenizer "
                          "with a fast tokenizer (tokenizer.save_pretrained())")
    fp32 = convert_opset(prepare_fp32(hf.onnx_model), opset or tgt.opset)
    spec = generation_spec(fp32, config, gen_config, str(model))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(hf.tokenizer_files["tokenizer.json"].decode("utf-8"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = [list(tokenizer.encode(t, add_special_tokens=True).ids)[:spec["context"]] for t in texts]
    held = [i for i in range(len(ids)) if i % 5 == 4] if len(ids) >= 5 else list(range(len(ids)))
    calib = [ids[i] for i in range(len(ids)) if i not in set(held) or len(ids) < 5][:num_samples]
    holdout = [ids[i] for i in held][:MAX_CHECK_TEXTS]
    timings["export_s"] = time.perf_counter() - t0

    weights = dataclasses.replace(weights, accuracy_level=ACCURACY_LEVEL)
    t1 = time.perf_counter()
    samples = [first_step_sample(fp32, spec, s) for s in calib] if weights.method == "gptq" else None
    quantized = quantize_weights(fp32, weights, samples, exclude_nodes=exclude_nodes, batch_size=1,
                                 progress=progress)
    timings["quantize_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    check = decoder_agreement(fp32, quantized, holdout, spec, tokenizer, new_tokens=check_tokens)
    timings["check_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    q_bytes = quantized.SerializeToString(deterministic=True)
    fp32_bytes = fp32.SerializeToString(deterministic=True)
    used = len(calib) if weights.method == "gptq" else 0
    settings = {"source": "weight-only", **weights.to_dict(), "calibration_samples": used}
    manifest = build_manifest(quantized, tgt, settings, None, reference=True, model_format="onnx-weight-only")
    manifest["generation"] = spec
    manifest["source_model"] = {"kind": "huggingface", "model_type": hf.model_type, "task": TASK}
    report = new_report(
        source="weight-only", target=tgt.name, method=weights.preset,
        weights={**weights.to_dict(), **weight_bytes(quantized)},
        calibration={"data": source, "samples": used},
        holdout={"samples": check.get("samples", 0), "disjoint_from_calibration": len(ids) >= 5},
        sizes=sizes_block(fp32_bytes, q_bytes),
        fidelity=[],
        generation={k: (round(v, 6) if isinstance(v, float) else v) for k, v in check.items()},
        kernels=None,
        timings={k: round(v, 3) for k, v in timings.items()},
    )
    files = {"model.onnx": q_bytes, "model.fp32.onnx": fp32_bytes, **hf.tokenizer_files,
             GENERATE_RUNTIME: resources.files("edgequant._runtime").joinpath(GENERATE_RUNTIME).read_bytes()}
    from ..bundle.golden import add_selftest
    from ..graph.sessions import checked_with

    # the self-test: the first generation step (empty cache) of held-out texts, in the target's arithmetic
    add_selftest(files, manifest, quantized, [first_step_sample(fp32, spec, s) for s in holdout],
                 level=checked_with(tgt).level)
    return write_bundle(out, files, manifest, report, force=force)


def generation_spec(model: onnx.ModelProto, config: dict, gen_config: dict, source: str) -> dict[str, Any]:
    """A decoder graph with a key/value cache + its config.json and generation_config.json → the manifest's
    ``generation`` entry (documented in runtimes/README.md and edgequant_generate.py)."""
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    if "input_ids" not in inputs or "logits" not in outputs:
        raise ExportError(f"{source}: the exported graph has no input_ids input or logits output; it is not a "
                          "decoder for text generation")
    cache = []
    for name, value in inputs.items():
        if not name.startswith(CACHE_PREFIX):
            continue
        present = PRESENT_PREFIX + name[len(CACHE_PREFIX):]
        dims = value.type.tensor_type.shape.dim
        axis = next((k for k, d in enumerate(dims) if "past" in d.dim_param), None)
        if present not in outputs or axis is None:
            raise ExportError(f"{source}: cache input {name!r} has no matching output {present!r} or no past-length "
                              "axis; export the model with optimum's text-generation-with-past")
        shape = [d.dim_value if d.HasField("dim_value") else (0 if k == axis else 1) for k, d in enumerate(dims)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        cache.append({"input": name, "output": present, "shape": shape, "axis": axis, "dtype": dtype})
    if not cache:
        raise ExportError(f"{source}: the exported graph has no key/value cache inputs ({CACHE_PREFIX}*)")
    context = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
                    if isinstance(config.get(k), int) and config[k] > 0), None)
    if context is None:
        raise ExportError(f"{source}/config.json names no context length (max_position_embeddings or n_positions)")
    eos = gen_config.get("eos_token_id", config.get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else [int(t) for t in eos or []]
    defaults = dict(HF_DEFAULTS)
    for key in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens"):
        if gen_config.get(key) is not None:
            defaults[key] = gen_config[key]
    return {"tokenizer": "tokenizer.json", "context": int(context), "eos_token_ids": eos,
            "bos_token_id": gen_config.get("bos_token_id", config.get("bos_token_id")),
            "inputs": {n: n for n in ("input_ids", "attention_mask", "position_ids") if n in inputs},
            "logits": "logits", "cache": cache, "defaults": defaults}


def first_step_sample(model: onnx.ModelProto, spec: dict, ids: list[int]) -> dict[str, np.ndarray]:
    """Token ids → one sample of the graph's inputs for the first step (empty cache), without a batch axis."""
    n = len(ids)
    sample = {"input_ids": np.asarray(ids, dtype=np.int64)}
    if "attention_mask" in spec["inputs"]:
        sample["attention_mask"] = np.ones(n, dtype=np.int64)
    if "position_ids" in spec["inputs"]:
        sample["position_ids"] = np.arange(n, dtype=np.int64)
    for c in spec["cache"]:
        sample[c["input"]] = np.zeros(c["shape"][1:], dtype=np.dtype(c["dtype"]))
    return sample


def _texts(calibration: Any) -> tuple[list[str], str]:
    if isinstance(calibration, (str, Path)):
        return read_texts(calibration), str(calibration)
    texts = [t for t in calibration or [] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("text data for a decoder is empty: pass a .txt file (one sample a line), a .jsonl file "
                        "or a list of strings")
    return texts, "texts"


def export_stage(run: Any) -> None:
    """The decoder job as one stage (``edgequant.jobs.PIPELINES["decoder"]``): the validated config's options →
    :func:`export_decoder` → the bundle on the Run."""
    cfg = run.config
    run.bundle = export_decoder(cfg.model, cfg.data, out=cfg.out, weights=cfg.weights.config(), target=run.target,
                                num_samples=cfg.data_options.num_samples, opset=cfg.target.opset,
                                exclude_nodes=cfg.calibration.exclude_nodes, force=cfg.force, progress=cfg.progress)
