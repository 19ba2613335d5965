"""GPTQ (Frantar et al., 2022) for block-quantized MatMul weights: fp32 weights + calibration activations →
integer weights, per-block scales and zero points in the layout of ONNX Runtime's ``MatMulNBits``.

ONNX Runtime ships a GPTQ configuration, but it runs through Intel Neural Compressor (not a dependency here)
and gathers every calibration activation in memory. This module is the algorithm alone, in numpy:

1. ``hessians``: one streaming pass of the fp32 model (each MatMul input added as a graph output), folding every
   batch into ``H = 2/n · Σ xᵀx`` per input tensor (a K×K float64 sum), so memory is one batch of activations
   plus the K×K sums, whatever the number of samples.
2. ``gptq``: per weight W (K×N, ``y = x @ W``): dampen ``H += λ·mean(diag H)·I``, take the upper Cholesky factor
   U of H⁻¹, then quantize input rows k = 0..K-1 in order; the grid of each block of ``block_size`` rows is chosen
   when the block starts (asymmetric min/max over the already-updated rows), and each row's rounding error
   ``e = (w - q(w)) / U[k, k]`` is pushed onto the rows not yet quantized (``W[k+1:] -= U[k, k+1:]ᵀ e``), lazily
   in batches of rows.
3. ``pack_nbits``: the integers, scales and zero points in ``MatMulNBits``' layout (B: N × blocks × block bytes,
   low nibble first; zero points packed the same way along the blocks), the layout ONNX Runtime's own
   ``quantize_matmul_4bits``/``8bits`` write (a test checks both dequantize to the same weights).

Block grid (asymmetric, as ONNX Runtime's RTN): lo = min(0, min w), hi = max(0, max w), s = (hi - lo) / (2ᵇ - 1),
z = round(-lo / s), q = clip(round(w / s) + z, 0, 2ᵇ - 1), w ≈ (q - z)·s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import CalibrationError
from ..graph.tap import tap

__all__ = ["block_grid", "gptq", "hessians", "pack_nbits", "rtn"]


def hessians(model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], inputs: Mapping[str, int], *,
             batch_size: int = 16, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """fp32 model + samples + {MatMul input tensor: K} → {tensor: H = 2/n · Σ xᵀx (K×K float64)}, streaming."""
    names = list(inputs)
    sums = {n: np.zeros((k, k)) for n, k in inputs.items()}
    rows = dict.fromkeys(names, 0)
    for _, values in tap(model, samples, names, batch_size=batch_size, progress=progress):
        for name, value in values.items():
            x = value.reshape(-1, inputs[name]).astype(np.float32, copy=False)
            sums[name] += x.T @ x  # float32 product per batch, float64 sum across batches
            rows[name] += x.shape[0]
    return {n: 2.0 * sums[n] / max(rows[n], 1) for n in names}


def block_grid(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, B) weights of one block per output column → (scale (N,), zero point (N,)), asymmetric min/max."""
    qmax = 2 ** bits - 1
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    return scale, zero


def _quantize(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)


def rtn(weight: np.ndarray, *, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: (K, N) weight → q (N, K) uint8, scales (N, K/block) float32, zero points (N, K/block)."""
    wt = weight.T.astype(np.float64)
    n, k = wt.shape
    blocks = wt.reshape(n, k // block_size, block_size)
    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    scale = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0)
    zero = np.clip(np.round(-lo / scale), 0, 2 ** bits - 1)
    q = _quantize(blocks, scale[..., None], zero[..., None], bits).reshape(n, k)
    return q.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def gptq(weight: np.ndarray, hessian: np.ndarray, *, bits: int, block_size: int, damp: float = 0.01,
         lazy: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, N) weight + (K, K) Hessian of its input → q (N, K) uint8, scales (N, K/block) float32, zero points
    (N, K/block) uint8, with GPTQ's error feedback (see the module docstring)."""
    w = weight.T.astype(np.float64)  # (N, K): one row per output column, as in the paper
    n, k = w.shape
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H⁻¹
    except np.linalg.LinAlgError:
        raise CalibrationError("the calibration activations give a singular Hessian even after damping; use "
                               "more or more varied calibration samples") from None
    lazy = max(lazy // block_size, 1) * block_size
    q = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, k // block_size))
    zeros = np.zeros((n, k // block_size))
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].copy()
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                b = col // block_size
                scales[:, b], zeros[:, b] = block_grid(w1[:, i:i + block_size], bits)
            b = col // block_size
            qi = _quantize(w1[:, i], scales[:, b], zeros[:, b], bits)
            q[:, col] = qi
            e = (w1[:, i] - (qi - zeros[:, b]) * scales[:, b]) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q, scales.astype(np.float32), zeros.astype(np.uint8)


def pack_nbits(q: np.ndarray, zeros: np.ndarray, *, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """q (N, K) + zero points (N, K/block) → MatMulNBits' B (N, K/block, block·bits/8) uint8 and packed zero
    points (N, ⌈(K/block)·bits/8⌉) uint8; 4-bit values go low nibble first."""
    n, k = q.shape
    blocks = k // block_size
    if bits == 8:
        return q.reshape(n, blocks, block_size).astype(np.uint8), zeros.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, block_size // 2)
    z = zeros if blocks % 2 == 0 else np.pad(zeros, ((0, 0), (0, 1)))
    return packed, (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
