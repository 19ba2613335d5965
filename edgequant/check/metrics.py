"""How close the int8 outputs are to the fp32 ones: the one place the checks (fidelity), the per-layer table
and the accuracy budget compute their figures, so a figure means the same in every part of the report.

Over N samples with fp32 outputs x and int8 outputs x̂ (each sample flattened):
- cosine: mean over samples of x·x̂ / (|x|·|x̂|) (1 where a sample's output is all zeros);
- SQNR: 10·log10(Σx² / Σ(x − x̂)²) dB, within ±``MAX_SQNR_DB`` (the cap when there is no error);
- argmax agreement: the fraction of samples whose largest class is the same (class-like (N, C) outputs);
- top-1: the fraction of samples whose largest class is the label.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_SQNR_DB", "argmax_agreement", "cosine", "sqnr_db", "sqnr_from_sums", "top1"]

MAX_SQNR_DB = 200.0


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    """Two output batches (N, ...) → the mean per-sample cosine similarity."""
    a = ref.reshape(ref.shape[0], -1).astype(np.float64)
    b = test.reshape(test.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, np.sum(a * b, axis=1) / np.maximum(den, 1e-30), 1.0)))


def sqnr_from_sums(signal: float, noise: float) -> float:
    """Σx² and Σ(x − x̂)² → SQNR in dB, capped at ±MAX_SQNR_DB (no error: +cap; no signal but error: −cap)."""
    if noise <= 0.0 or signal <= 0.0:
        return MAX_SQNR_DB if noise <= 0.0 else -MAX_SQNR_DB
    return float(min(MAX_SQNR_DB, max(-MAX_SQNR_DB, 10.0 * math.log10(signal / noise))))


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Two arrays of the same shape → their SQNR in dB (see :func:`sqnr_from_sums`)."""
    r64 = ref.astype(np.float64)
    return sqnr_from_sums(float(np.sum(r64 ** 2)), float(np.sum((r64 - test.astype(np.float64)) ** 2)))


def argmax_agreement(ref: np.ndarray, test: np.ndarray) -> float | None:
    """Two (N, C) output batches → the fraction of samples with the same argmax; None unless class-like (C > 1)."""
    if ref.ndim != 2 or ref.shape[1] <= 1:
        return None
    return float(np.mean(np.argmax(ref, axis=1) == np.argmax(test, axis=1)))


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    """(N, C) outputs + N integer labels → the fraction of samples whose argmax is the label."""
    return float(np.mean(np.argmax(outputs, axis=1) == labels))
