"""A tiny GPT-2-shaped causal language model over UTF-8 bytes, and the text it is trained and judged on.

The text is the Python reference manual's topic pages that ship with CPython (``pydoc_data.topics``); the
first 90% (by topic name) trains, the last 10% is held out for perplexity. The tokenizer is the identity on
UTF-8 bytes (vocabulary of 256, token id = byte value), so no vocabulary file is needed: ``encode`` and
``decode`` below are the whole tokenizer. ``build()`` is the factory `edgequant export` calls.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
VOCAB = 256
SEQ = 128
WIDTH = 256
LAYERS = 3
HEADS = 4
HOLDOUT_FRACTION = 0.1


def encode(text: str) -> np.ndarray:
    """Text → int64 token ids (UTF-8 bytes)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(ids) -> str:
    """Token ids → text (invalid UTF-8 sequences are replaced)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_text() -> tuple[np.ndarray, np.ndarray]:
    """The Python reference manual topics → (train ids, held-out ids), split 90/10 at a topic boundary."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * (1 - HOLDOUT_FRACTION))
    train = "\n\n".join(topics[n] for n in names[:cut])
    held = "\n\n".join(topics[n] for n in names[cut:])
    return encode(train), encode(held)


def windows(ids: np.ndarray, n: int | None = None, seq: int = SEQ) -> np.ndarray:
    """Non-overlapping (N, seq) int64 windows from the start of ``ids`` (at most ``n``)."""
    count = len(ids) // seq if n is None else min(n, len(ids) // seq)
    return np.ascontiguousarray(ids[:count * seq].reshape(count, seq))


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention and a 4× GELU MLP, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """(N, T) int64 byte ids → (N, T, 256) next-byte logits; token + learned position embeddings, no KV cache."""

    def __init__(self, width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS, seq: int = SEQ) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build() -> nn.Module:
    """The trained TinyLM in eval mode, in float32 (the committed weights are stored as float16)."""
    model = TinyLM()
    state = torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def log_probs(logits_fn, ids: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, T) windows → (N, T, 256) float64 next-byte log-probabilities; ``logits_fn`` maps a batch to logits."""
    logits = np.concatenate([np.asarray(logits_fn(ids[i:i + batch_size]), dtype=np.float64)
                             for i in range(0, len(ids), batch_size)])
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def perplexity(logits_fn, ids: np.ndarray, batch_size: int = 32) -> float:
    """exp(mean next-byte cross-entropy) over (N, T) windows (each window predicts its bytes 2..T)."""
    logp = log_probs(logits_fn, ids, batch_size)[:, :-1]
    return math.exp(-float(np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()))


def kl_divergence(ref_logp: np.ndarray, logp: np.ndarray) -> float:
    """Mean per-position KL(reference ‖ other) in nats between two log-probability arrays of the same shape."""
    return float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1)))
