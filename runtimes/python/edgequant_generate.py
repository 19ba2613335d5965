"""edgequant text generation: a decoder bundle's model, token by token with its key/value cache.

Imports only the standard library, numpy and the ``tokenizers`` package (``pip install tokenizers``), so it can
be copied next to a bundle and run on the device. ``edgequant_runtime.Session.generate`` loads it from the
bundle (verified like the model) and hands it the ONNX Runtime session; it reads the manifest's ``generation``
entry, written by ``edgequant export`` for a decoder-only Hugging Face model (optimum's
``text-generation-with-past`` graph):

``{"tokenizer": "tokenizer.json", "context": 1024, "eos_token_ids": [50256], "bos_token_id": 50256,
"inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"},
"logits": "logits", "cache": [{"input": "past_key_values.0.key", "output": "present.0.key",
"shape": [1, 12, 0, 64], "axis": 2, "dtype": "float32"}, ...], "defaults": {"max_new_tokens": 32,
"do_sample": false, "temperature": 1.0, "top_k": 50, "top_p": 1.0}}``

One step of the loop: feed the new tokens (the whole prompt first, then one token), the attention mask over
every position so far (all ones, batch 1), their positions, and the cache (``shape`` with length 0 along
``axis`` at the start); take the last position's logits and the ``output`` tensors as the next cache.
Choosing a token: greedy takes argmax(logits); sampling divides the logits by ``temperature``, keeps the
``top_k`` largest and the smallest set whose probabilities sum to ``top_p``, and draws from
p = softmax(kept logits) with a numpy generator seeded by ``seed`` (the same seed, the same text).
Generation stops at an end-of-sequence token (``eos_token_ids`` and any ``stop_ids``), when the text contains
one of ``stop`` strings (which are cut off), after ``max_new_tokens``, or at the end of the context.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GenerationError", "GenerationResult", "Generator"]


class GenerationError(ValueError):
    """A prompt or option the model cannot take (too long for the context, an unknown option value)."""


@dataclass
class GenerationResult:
    """The generated text and tokens, why generation stopped, and how long the two phases took."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "stop", "length" (max_new_tokens) or "context"
    prompt_s: float  # prompt processing: the first step, which also yields the first new token
    decode_s: float  # every step after the first
    truncated_tokens: int = 0  # prompt tokens dropped from the start (truncate=True)
    step_s: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding (the memory-bound phase)."""
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


class Generator:
    """An ONNX Runtime session of a decoder graph + the manifest's ``generation`` entry → ``generate``."""

    def __init__(self, session, bundle: str, manifest: Mapping, *, tokenizer=None):
        spec = manifest.get("generation")
        if not spec:
            raise GenerationError(f"{bundle}: the bundle has no generation entry; it was not exported from a "
                                  "decoder model")
        self.spec = dict(spec)
        self.session = session
        if tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(os.path.join(bundle, spec["tokenizer"]))
            tokenizer.no_padding()
            tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.context = int(spec["context"])
        self.eos = {int(t) for t in spec.get("eos_token_ids") or []}
        self.defaults = dict(spec.get("defaults") or {})
        names = {i.name for i in session.get_inputs()}
        self.inputs = {k: v for k, v in spec["inputs"].items() if v and v in names}
        self.cache = list(spec["cache"])
        logits = next((o for o in session.get_outputs() if o.name == spec["logits"]), None)
        last = logits.shape[-1] if logits is not None and logits.shape else None
        self.vocab = last if isinstance(last, int) and last > 0 else None

    def empty_feed(self, tokens: int = 1) -> dict[str, np.ndarray]:
        """Inputs for a first step of ``tokens`` zeros and an empty cache (used to probe node placement)."""
        return self.feed(np.zeros(tokens, dtype=np.int64), 0, self.empty_cache())

    def empty_cache(self) -> list[np.ndarray]:
        """The key/value cache before the first step: one array per cache input, length 0 along its axis."""
        return [np.zeros([int(d) for d in c["shape"]], dtype=np.dtype(c.get("dtype", "float32"))) for c in self.cache]

    def feed(self, ids: np.ndarray, past: int, cache: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """New token ids (1-D) after ``past`` cached positions + the cache → the graph's inputs (batch 1)."""
        n = len(ids)
        feed = {self.inputs["input_ids"]: ids[None].astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed[self.inputs["attention_mask"]] = np.ones((1, past + n), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed[self.inputs["position_ids"]] = np.arange(past, past + n, dtype=np.int64)[None]
        feed.update({c["input"]: v for c, v in zip(self.cache, cache)})
        return feed

    def encode(self, prompt: str) -> list[int]:
        """Text → token ids with the model's own tokenizer (and its special tokens, e.g. a leading BOS)."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int | None = None, *,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
                 stop_ids: Sequence[int] = (), truncate: bool = False,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """A prompt (text or token ids) → the continuation. Unset options take the bundle's defaults (the
        model's generation_config.json). ``on_text`` receives each new piece of text as it is decoded."""
        d = self.defaults
        max_new = int(d.get("max_new_tokens", 32) if max_new_tokens is None else max_new_tokens)
        do_sample = bool(d.get("do_sample", False) if do_sample is None else do_sample)
        temperature = float(d.get("temperature", 1.0) if temperature is None else temperature)
        top_k = int(d.get("top_k", 0) if top_k is None else top_k)
        top_p = float(d.get("top_p", 1.0) if top_p is None else top_p)
        if max_new < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, not {max_new}")
        if do_sample and not temperature > 0:
            raise GenerationError(f"temperature must be above 0 for sampling, not {temperature}")
        if not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], not {top_p}")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if self.vocab is not None and any(not 0 <= t < self.vocab for t in ids):
            bad = next(t for t in ids if not 0 <= t < self.vocab)
            raise GenerationError(f"token id {bad} is outside the model's vocabulary (0 to {self.vocab - 1})")
        if not ids:
            raise GenerationError("the prompt is empty after tokenization and the tokenizer adds no start token: "
                                  "give at least one word")
        dropped = 0
        if len(ids) >= self.context:
            if not truncate:
                raise GenerationError(f"the prompt has {len(ids)} tokens, the model's context is {self.context}: "
                                      f"shorten it to under {self.context} tokens, or ask for truncation "
                                      "(truncate=True, --truncate) to keep its last tokens")
            keep = max(1, self.context - max_new)
            dropped, ids = len(ids) - keep, ids[-keep:]
        stop_set = self.eos | {int(t) for t in stop_ids}
        rng = np.random.default_rng(seed)
        cache = self.empty_cache()
        out_names = [self.spec["logits"], *(c["output"] for c in self.cache)]
        new: list[int] = []
        times: list[float] = []
        shown, finish = "", "length"
        step_ids, past = np.asarray(ids, dtype=np.int64), 0
        while True:
            t = time.perf_counter()
            logits, *cache = self.session.run(out_names, self.feed(step_ids, past, cache))
            past += len(step_ids)
            token = self._choose(logits[0, -1], do_sample, temperature, top_k, top_p, rng)
            times.append(time.perf_counter() - t)
            if token in stop_set:
                finish = "eos"
                break
            new.append(token)
            text = self.decode(new)
            cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            if on_text is not None and not text.endswith("\ufffd") and len(text) > len(shown):
                on_text(text[len(shown):])
                shown = text
            if finish == "stop":
                break
            if len(new) >= max_new:
                break
            if past + 1 > self.context:
                finish = "context"
                break
            step_ids = np.asarray([token], dtype=np.int64)
        text = self.decode(new)
        if finish == "stop":
            text = text[:min(i for i in (text.find(s) for s in stop if s) if i >= 0)]
        if on_text is not None and len(text) > len(shown) and text.startswith(shown):
            on_text(text[len(shown):])
        return GenerationResult(text, new, len(ids), finish, times[0], float(sum(times[1:])), dropped, times)

    @staticmethod
    def _choose(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
                rng: np.random.Generator) -> int:
        z = np.asarray(logits, dtype=np.float64)
        if not do_sample:
            return int(np.argmax(z))
        z = z / temperature
        order = np.argsort(-z, kind="stable")
        if top_k > 0:
            order = order[:top_k]
        kept = z[order]
        p = np.exp(kept - kept.max())
        p /= p.sum()
        if top_p < 1.0:
            n = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            order, p = order[:n], p[:n] / p[:n].sum()
        return int(order[rng.choice(len(order), p=p)])
