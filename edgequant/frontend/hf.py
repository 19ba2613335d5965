"""A local Hugging Face model folder → :class:`HFModel`: the fp32 ONNX graph (optimum's exporter), the
tokenizer files and settings the device needs to turn text into inputs, and the pooling the model expects.

Export is optimum's job (``optimum.exporters.onnx.main_export``): it knows each architecture's inputs, dynamic
axes and tasks. What it does not do, and is done here: refuse anything but a local folder (nothing is ever
downloaded; the hub is switched to offline mode while exporting), turn its failures into one-line errors, keep
its output off the user's disk (it writes into a temporary folder that is read back into memory), and read
sentence-transformers' pooling configuration (``modules.json`` → ``1_Pooling/config.json``, ``Normalize``),
which the plain encoder graph leaves to the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ..errors import ExportError, option
from ..quiet import EXPORTER_LOGGERS
from ..quiet import quiet as _quiet

__all__ = ["DECODER_TASKS", "HFModel", "is_causal_lm", "is_hf_folder", "load_hf", "read_decoder_config"]

log = logging.getLogger(__name__)

# Tasks that mean a decoder exported for generation (always with its key/value cache: see jobs/decoder.py).
DECODER_TASKS = ("text-generation-with-past", "text-generation")
GENERATION_CONFIG = "generation_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
# Tokenizer files the device may need; tokenizer.json alone is enough for the ``tokenizers`` package.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class HFModel:
    """An exported Hugging Face model: fp32 ONNX, task, tokenizer files (name → bytes) and pooling."""

    source: str
    task: str
    model_type: str
    onnx_model: onnx.ModelProto = field(repr=False)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict, repr=False)
    pooling: dict[str, Any] | None = None
    max_positions: int | None = None  # the longest sequence the model's position embeddings cover

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.json" in self.tokenizer_files

    def tokenizer(self) -> Any:
        """The model's own tokenizer (transformers' fast tokenizer, from the files that travel in the bundle)."""
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="edgequant-tok-") as tmp:
            for name, data in self.tokenizer_files.items():
                Path(tmp, name).write_bytes(data)
            with _offline(), quiet():
                return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def is_hf_folder(path: Any) -> bool:
    """True for a folder holding a Hugging Face ``config.json``."""
    return isinstance(path, (str, Path)) and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf(folder: str | Path, *, task: str = "feature-extraction", opset: int = 18) -> HFModel:
    """A local model folder (config.json + weights + tokenizer files) → :class:`HFModel` (fp32 ONNX in memory)."""
    folder = Path(folder)
    config = _read_config(folder)
    model_type = str(config.get("model_type", ""))
    _check_task(folder, model_type, task)
    tok_files = _tokenizer_files(folder)
    pooling = read_pooling(folder)
    with tempfile.TemporaryDirectory(prefix="edgequant-hf-") as tmp:
        _export(folder, task, opset, tmp)
        model = onnx.load(os.path.join(tmp, "model.onnx"))
    log.info("exported %s (%s, task %s) with optimum", folder, model_type, task)
    positions = config.get("max_position_embeddings")
    return HFModel(str(folder), task, model_type, model, tok_files, pooling,
                   positions if isinstance(positions, int) and positions > 0 else None)


def is_causal_lm(path: Any) -> bool:
    """True for a Hugging Face model folder whose config names a causal language model (``...ForCausalLM``,
    ``...LMHeadModel``): a decoder for text generation."""
    if not is_hf_folder(path):
        return False
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel"))
                                           for a in archs)


def read_decoder_config(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A decoder's model folder → (config.json, generation_config.json), both required: generation needs the
    end-of-sequence tokens and the model's own decoding defaults, and the bundle needs its tokenizer."""
    folder = Path(folder)
    config = _read_config(folder)
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        raise ExportError(f"{folder} has no {GENERATION_CONFIG}: a decoder bundle needs the model's end-of-sequence "
                          "tokens and decoding defaults; save it with model.generation_config.save_pretrained()")
    generation = _json_object(path, "a generation config", "save it again with save_pretrained()")
    if not (folder / "tokenizer.json").is_file() and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ExportError(f"{folder} has no tokenizer.json: a decoder bundle carries the model's own tokenizer; "
                          "save it with tokenizer.save_pretrained() into that folder")
    return config, generation


def _json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON file that must hold one object → the object; an ExportError naming the file and the fix."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not {what} (a JSON object)")
    return data


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder: pass a Hugging Face model folder (config.json, weights, "
                          "tokenizer files)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ExportError(f"{folder} is not a Hugging Face model folder: config.json is missing; save the model "
                          "with save_pretrained() into that folder")
    config = _json_object(cfg, "a Hugging Face model config", "save the model again with save_pretrained()")
    if "model_type" not in config:
        raise ExportError(f"{cfg} has no 'model_type': it is not a Hugging Face model config")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise ExportError(f"{folder} has no weights ({', '.join(WEIGHT_FILES[:2])}); save the model with "
                          "save_pretrained() into that folder")
    return config


def supported_tasks(model_type: str) -> list[str]:
    """The tasks optimum's ONNX exporter knows for a model type (empty if it does not know the type)."""
    with quiet():
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager

        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx",
                                                                    library_name="transformers")
        except KeyError:
            return []
    return sorted(tasks)


def _check_task(folder: Path, model_type: str, task: str) -> None:
    tasks = supported_tasks(model_type)
    if not tasks:
        raise ExportError(f"{folder}: optimum cannot export model type {model_type!r} to ONNX; export it yourself "
                          "and pass the .onnx file")
    if task not in tasks:
        raise ExportError(f"{folder}: optimum does not know task {task!r} for a {model_type} model; use "
                          f"{option('task')} with one of {', '.join(tasks)}")


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The folder's tokenizer files; a tokenizer.json is written from a slow tokenizer's vocabulary if missing."""
    files = {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}
    if files and "tokenizer.json" not in files:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="edgequant-tok-") as tmp, _offline(), quiet():
            try:
                tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
                tok.save_pretrained(tmp)
            except Exception as exc:  # transformers raises assorted types
                raise ExportError(f"{folder}: cannot load its tokenizer ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]})") from None
            if Path(tmp, "tokenizer.json").is_file():
                files["tokenizer.json"] = Path(tmp, "tokenizer.json").read_bytes()
    return files


def read_pooling(folder: Path) -> dict[str, Any] | None:
    """sentence-transformers' modules.json → {"mode": "mean"|"cls"|"max"|"mean_sqrt_len", "normalize": bool}."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{modules}: not valid JSON ({exc})") from None
    mode, normalize = None, False
    for entry in entries:
        kind = str(entry.get("type", ""))
        if kind.endswith(".Pooling"):
            cfg_path = folder / entry.get("path", "") / "config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
            for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                              ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens",
                                                                   "mean_sqrt_len")):
                if cfg.get(key):
                    mode = name
                    break
            if cfg and mode is None:
                raise ExportError(f"{cfg_path}: pooling mode not supported on the device (mean, cls, max or "
                                  "mean_sqrt_len); set one of them")
            mode = mode or "mean"
        elif kind.endswith(".Normalize"):
            normalize = True
    return {"mode": mode, "normalize": normalize} if mode else None


def _export(folder: Path, task: str, opset: int, out: str) -> None:
    with _offline(), quiet():
        from optimum.exporters.onnx import main_export

        try:
            main_export(str(folder), output=out, task=task, opset=opset, device="cpu", do_validation=False,
                        local_files_only=True, library_name="transformers")
        except Exception as exc:  # optimum and transformers raise assorted types
            line = next((s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__)
            raise ExportError(f"{folder}: optimum's ONNX export failed: {type(exc).__name__}: {line[:300]}") from exc
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        raise ExportError(f"{folder}: optimum wrote no model.onnx for task {task!r} (a multi-part model?); export "
                          "it yourself and pass the .onnx file")


@contextlib.contextmanager
def _offline():
    """No download, ever: the hub libraries read these at call time."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet():
    """optimum, transformers and the packages they import print tracer warnings and notices through logging,
    warnings and stderr; keep the CLI's output ours (failures are re-raised as one ExportError line)."""
    return _quiet(*EXPORTER_LOGGERS, level=logging.CRITICAL, all_loggers=True)
