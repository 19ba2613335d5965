"""edgequant text adapter: raw text → a bundle's input arrays, and the model's output → pooled embeddings.

Imports only the standard library, numpy and the ``tokenizers`` package (``pip install tokenizers``; no
transformers, no torch), so it can be copied next to a bundle and run on the device. It reads two manifest
entries that bundles exported from a Hugging Face text model carry:

``tokenizer``: ``{"file": "tokenizer.json", "files": [...], "max_length": 128, "padding": "max_length",
"truncation": true, "pad_id": 0, "pad_token": "[PAD]", "pad_type_id": 0, "inputs": {"input_ids": "ids",
"attention_mask": "attention_mask", "token_type_ids": "type_ids"}}`` — every sequence is padded (and truncated)
to ``max_length`` tokens, the length the int8 ranges were calibrated at; ``inputs`` maps each model input to a
field of the ``tokenizers`` Encoding.

``pooling`` (or null): ``{"output": "last_hidden_state", "mode": "mean", "normalize": true,
"mask_input": "attention_mask"}`` — how token embeddings become one sentence embedding:
mean: e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9); cls: e = h_0; max: e = max over unmasked t;
mean_sqrt_len: e = Σ_t m_t h_t / sqrt(Σ_t m_t); then, with ``normalize``, e / max(‖e‖₂, 1e-12).

Example (with onnxruntime)::

    text = TextInputs("bundle/")
    feeds = text.encode(["a robot arm", "a gripper"])
    hidden = session.run([text.pooling["output"]], feeds)[0]
    embeddings = text.pool(hidden, feeds)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["TextInputs", "pool"]

_DTYPES = {"int64": np.int64, "int32": np.int32}


class TextInputs:
    """A bundle folder (or its manifest dict and folder) → a callable that turns text into input arrays."""

    def __init__(self, bundle: str, manifest: Mapping | None = None, *, tokenizer_json: bytes | str | None = None):
        """``tokenizer_json``: the contents of ``tokenizer.file`` as already read (and verified) by the caller;
        without it the file is read from the bundle folder."""
        from tokenizers import Tokenizer

        if manifest is None:
            with open(os.path.join(bundle, "manifest.json"), encoding="utf-8") as fh:
                manifest = json.load(fh)
        spec = manifest.get("tokenizer")
        if not spec:
            raise ValueError(f"{bundle}: the bundle has no tokenizer entry; it was not exported from a text model")
        self.spec = dict(spec)
        self.pooling = manifest.get("pooling")
        self.dtypes = {i["name"]: i.get("dtype", "int64") for i in manifest.get("inputs", [])}
        if tokenizer_json is not None:
            text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
            tok = Tokenizer.from_str(text)
        else:
            tok = Tokenizer.from_file(os.path.join(bundle, spec["file"]))
        length = int(spec["max_length"])
        if spec.get("truncation", True):
            tok.enable_truncation(length)
        if spec.get("padding", "max_length") == "max_length":
            tok.enable_padding(length=length, pad_id=int(spec.get("pad_id", 0)),
                               pad_type_id=int(spec.get("pad_type_id", 0)), pad_token=spec.get("pad_token", "[PAD]"))
        self.tokenizer = tok

    def encode(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """One text or a list → {input name: (batch, max_length) integer array}."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.tokenizer.encode_batch(batch)
        out = {}
        for name, attr in self.spec["inputs"].items():
            dtype = _DTYPES.get(self.dtypes.get(name, "int64"), np.int64)
            out[name] = np.asarray([getattr(e, attr) for e in encodings], dtype=dtype)
        return out

    def pool(self, hidden: np.ndarray, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Token embeddings (batch, tokens, dim) + the feeds they came from → (batch, dim) per ``pooling``."""
        if not self.pooling:
            raise ValueError("the bundle records no pooling; use the model's outputs as they are")
        return pool(hidden, feeds[self.pooling.get("mask_input", "attention_mask")], self.pooling)


def pool(hidden: np.ndarray, mask: np.ndarray, spec: Mapping) -> np.ndarray:
    """(batch, tokens, dim) float + (batch, tokens) 0/1 mask → (batch, dim) float32, per the pooling spec."""
    h = np.asarray(hidden, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)[:, :, None]
    mode = spec.get("mode", "mean")
    if mode == "mean":
        e = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    elif mode == "mean_sqrt_len":
        e = (h * m).sum(axis=1) / np.sqrt(np.maximum(m.sum(axis=1), 1e-9))
    elif mode == "cls":
        e = h[:, 0]
    elif mode == "max":
        e = np.where(m > 0, h, np.float32(-1e9)).max(axis=1)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}: use mean, mean_sqrt_len, cls or max")
    if spec.get("normalize"):
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return e.astype(np.float32)
