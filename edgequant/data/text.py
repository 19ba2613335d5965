"""Text calibration data: a ``.txt`` (one sample a line) or ``.jsonl`` file → :class:`~edgequant.data.samples.Samples`
of token arrays, tokenized with the model's own tokenizer and padded to a fixed length; and the check that
matters for an encoder: pooled sentence embeddings, int8 against fp32.

Tokenization uses transformers' fast tokenizer loaded from the model's files (what the model was trained
with); the device reproduces it from the same ``tokenizer.json`` with ``runtimes/python/edgequant_text.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .samples import Samples
from ..errors import DataError

__all__ = ["TEXT_SUFFIXES", "TextPreprocess", "embedding_agreement", "read_texts", "tokenize"]

TEXT_SUFFIXES = (".txt", ".jsonl")
# Fields of a tokenizers Encoding that feed each usual Hugging Face input.
_ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


@dataclass(frozen=True)
class TextPreprocess:
    """How text becomes model inputs: tokenize, truncate and pad every sample to ``max_length`` tokens."""

    max_length: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or not 2 <= self.max_length <= 8192:
            raise DataError(f"--max-length must be an integer from 2 to 8192, not {self.max_length!r}")


def is_text_path(data: Any) -> bool:
    return isinstance(data, (str, Path)) and Path(data).suffix.lower() in TEXT_SUFFIXES


def read_texts(path: str | Path) -> list[str]:
    """``.txt`` (one sample per non-blank line) or ``.jsonl`` (a string or an object with "text" per line) →
    the texts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text data {path} does not exist: pass a .txt file (one sample a line) or a .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    texts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); write one JSON value per line") from None
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise DataError(f"{path}:{number}: expected a string or an object with a \"text\" string")
            if not item.strip():
                continue
            texts.append(item)
        else:
            texts.append(line.strip())
    if not texts:
        raise DataError(f"{path} holds no text: put one calibration sample per line")
    return texts


def tokenize(texts: Sequence[str], tokenizer: Any, input_names: Sequence[str], pre: TextPreprocess, *,
             source: str) -> Samples:
    """Texts + a fast tokenizer → Samples of {input: (max_length,) int64} for the model's inputs."""
    unknown = [n for n in input_names if n not in _ENCODING_FIELDS]
    if unknown:
        raise DataError(f"{source}: the model's inputs {unknown} are not token ids, attention mask or token "
                        "types; text data feeds only text models")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=pre.max_length,
                    return_token_type_ids=True, return_attention_mask=True, return_tensors="np")
    arrays = {name: np.asarray(enc[name], dtype=np.int64) for name in input_names}
    loaders = [(lambda i=i: {k: v[i] for k, v in arrays.items()}) for i in range(len(texts))]
    return Samples(loaders, [f"{source}:{i + 1}" for i in range(len(texts))], source)


def tokenizer_manifest(tokenizer: Any, files: Sequence[str], input_names: Sequence[str],
                       pre: TextPreprocess) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry, read by ``edgequant_text.TextInputs`` on the device."""
    return {
        "file": "tokenizer.json",
        "files": sorted(files),
        "max_length": pre.max_length,
        "padding": "max_length",
        "truncation": True,
        "pad_id": int(tokenizer.pad_token_id or 0),
        "pad_token": str(tokenizer.pad_token or "[PAD]"),
        "pad_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "inputs": {n: _ENCODING_FIELDS[n] for n in input_names},
    }


def embedding_agreement(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples: Samples, pooling: dict[str, Any],
                        *, batch_size: int = 16, level: str = "all") -> dict[str, Any]:
    """Both models on held-out samples → agreement of the pooled embeddings: mean/min cosine, and Spearman's
    rank correlation of all pairwise similarities (does int8 order sentence pairs as fp32 does?)."""
    from .._runtime.edgequant_text import pool
    from ..graph.sessions import batches, session

    s_ref, s_q = session(fp32), session(int8, level=level)  # int8 in the target's arithmetic
    output = pooling["output"]
    dtypes = {i.name: np.dtype(np.int64) for i in s_ref.get_inputs()}
    refs, tests = [], []
    for batch in batches(samples, batch_size, dtypes):
        mask = batch[pooling.get("mask_input", "attention_mask")]
        refs.append(pool(s_ref.run([output], batch)[0], mask, pooling))
        tests.append(pool(s_q.run([output], batch)[0], mask, pooling))
    a, b = np.concatenate(refs).astype(np.float64), np.concatenate(tests).astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    rho = None
    if len(a) >= 3:
        an = a / np.linalg.norm(a, axis=1, keepdims=True)
        bn = b / np.linalg.norm(b, axis=1, keepdims=True)
        iu = np.triu_indices(len(a), 1)
        rho = spearman((an @ an.T)[iu], (bn @ bn.T)[iu])
    diff = np.abs(a - b)
    return {"output": f"{output} ({pooling['mode']} pooling{', normalized' if pooling.get('normalize') else ''})",
            "samples": len(a), "cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "spearman_pairwise": rho, "max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean()),
            "fp32_abs_max": float(np.abs(a).max()), "argmax_agreement": None}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks; ties are negligible for float scores)."""
    rx = np.empty(len(x))
    ry = np.empty(len(y))
    rx[np.argsort(x, kind="stable")] = np.arange(len(x))
    ry[np.argsort(y, kind="stable")] = np.arange(len(y))
    return float(np.corrcoef(rx, ry)[0, 1])
