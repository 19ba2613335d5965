"""Streaming calibration: fp32 ONNX + samples → an activation range ``(lo, hi)`` per tensor.

ONNX Runtime's own calibrators gather every activation of every sample before computing a range, so their
memory grows with the data (hundreds of GB on BERT). Here each observer folds a batch into a fixed-size state
(min/max, or a 2048-bin histogram whose symmetric range doubles, merging bin pairs, when a larger value
arrives), so memory is bounded by one batch of activations, whatever the number of samples.

Methods: ``minmax`` (observed extremes), ``percentile`` (clip the outer 0.001% per side), ``entropy``
(TensorRT-style KL-divergence threshold) and ``mse`` (the clip range that minimises expected squared
quantization error over the histogram).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import CalibrationError
from ..graph.sessions import batches  # noqa: F401  (re-exported: samples → batches)
from ..graph.tap import tap

__all__ = ["METHODS", "HistogramObserver", "MinMaxObserver", "batches", "calibrate", "check_method", "fixed_batch",
           "tensors_to_calibrate"]

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


class MinMaxObserver:
    """Running min/max; range = (min(0, lo), max(0, hi)) so that 0 is exactly representable. A tensor that holds
    an infinity (an attention mask's -inf) gets (-inf, inf): ``finite`` turns False, and quantize.qdq keeps the
    tensor and the nodes that write or read it float."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.finite = True

    @property
    def seen(self) -> bool:
        """Some values were seen."""
        return not self.finite or bool(np.isfinite(self.lo))

    def update(self, x: np.ndarray) -> None:
        if x.size and not np.isfinite(x).all():
            self.finite = False
        if x.size and self.finite:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        if not self.finite:
            return -np.inf, np.inf
        return min(self.lo, 0.0), max(self.hi, 0.0)


class HistogramObserver(MinMaxObserver):
    """Fixed-size histogram over [-R, R]; R doubles (adjacent bins merge) when a larger |x| arrives."""

    def __init__(self, method: str, bins: int = 2048, percentile: float = 99.999) -> None:
        super().__init__()
        self.method = method
        self.bins = bins
        self.percentile = percentile
        self.hist = np.zeros(bins, dtype=np.int64)
        self.R = 0.0

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        flat = x.ravel()
        if not flat.size or not self.finite:
            return
        amax = max(abs(self.lo), abs(self.hi))
        if self.R == 0.0:
            self.R = amax if amax > 0 else 1e-8
        while amax > self.R:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros_like(self.hist)
            q = self.bins // 4
            self.hist[q:q + merged.size] = merged
            self.R *= 2.0
        idx = ((flat.astype(np.float64) + self.R) * (self.bins / (2.0 * self.R))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _centres(self) -> np.ndarray:
        width = 2.0 * self.R / self.bins
        return -self.R + (np.arange(self.bins) + 0.5) * width

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        if not self.finite or self.hist.sum() == 0 or hi <= lo:
            return lo, hi
        if self.method == "percentile":
            cdf = np.cumsum(self.hist) / self.hist.sum()
            tail = (100.0 - self.percentile) / 100.0
            edges = -self.R + np.arange(1, self.bins + 1) * (2.0 * self.R / self.bins)
            qlo = edges[np.searchsorted(cdf, tail)] - 2.0 * self.R / self.bins
            qhi = edges[min(np.searchsorted(cdf, 1.0 - tail), self.bins - 1)]
            return min(0.0, max(lo, qlo)), max(0.0, min(hi, qhi))
        if self.method == "entropy":
            t = _kl_threshold(self._abs_hist(), self.R)
            return max(lo, -t) if lo < 0 else 0.0, min(hi, t)
        if self.method == "mse":
            return _mse_range(self.hist, self._centres(), lo, hi)
        return lo, hi

    def _abs_hist(self) -> np.ndarray:
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1]


def _kl_threshold(hist: np.ndarray, R: float, levels: int = 128) -> float:
    """TensorRT's entropy calibration on |x|: the clip threshold whose 128-level quantized distribution is
    closest (KL divergence) to the clipped reference distribution.

    The first bin (|x| near 0) takes its neighbour's count, as NVIDIA's pytorch-quantization does: after a
    ReLU/ReLU6 half or more of all values are exact zeros, which every candidate represents exactly (zero is
    on the grid). Left in, that spike dominates the divergence: a candidate spreads it over the non-empty
    bins of its first quantization step, so the smallest candidate (one bin per step) always wins and every
    such tensor was clipped to 1/8 of its range (EfficientNet-Lite0: cosine 0.08)."""
    n = hist.size
    width = R / n
    total = hist.astype(np.float64)
    if n > 1:
        total[0] = total[1]
    best, best_i = np.inf, n
    for i in sorted(set(range(levels, n + 1, max(1, (n - levels) // 256))) | {n}):
        ref = total[:i].copy()
        ref[i - 1] += total[i:].sum()
        groups = np.array_split(np.arange(i), levels)
        cand = np.zeros(i)
        for g in groups:
            seg = total[g]
            nz = seg > 0
            if nz.any():
                cand[g[nz]] = seg[nz].sum() / nz.sum()
        p = ref / max(ref.sum(), 1e-12)
        q = cand / max(cand.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def _mse_range(hist: np.ndarray, centres: np.ndarray, lo: float, hi: float, levels: int = 255) -> tuple[float, float]:
    """Shrink (lo, hi) by a common factor α ∈ [0.02, 1]; keep the α with the least expected squared error
    E[(x - dq(q(x)))²] over the histogram, where q rounds to ``levels`` steps and clips to [α·lo, α·hi]."""
    mask = hist > 0
    x, w = centres[mask], hist[mask].astype(np.float64)
    best, best_range = np.inf, (lo, hi)
    for alpha in np.geomspace(0.02, 1.0, 120):
        a, b = alpha * lo, alpha * hi
        scale = (b - a) / levels
        if scale <= 0:
            continue
        q = np.clip(np.round((x - a) / scale), 0, levels) * scale + a
        err = float(np.sum(w * (x - q) ** 2))
        if err < best:
            best, best_range = err, (a, b)
    return best_range


def check_method(method: str, *, auto: bool = False) -> str:
    """A calibration method name → itself, or a CalibrationError naming the ones there are (``auto`` too where
    the job can choose a method per tensor)."""
    allowed = (*METHODS, "auto") if auto else METHODS
    if method not in allowed:
        raise CalibrationError(f"unknown calibration method {method!r}: use one of {', '.join(allowed)}")
    return method


def tensors_to_calibrate(model: onnx.ModelProto, op_types: Sequence[str]) -> list[str]:
    """Float activations read or written by a node whose op type is quantized (initializers excluded)."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    elem = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    wanted = set(op_types)
    names: list[str] = []
    seen: set[str] = set()
    for node in graph.node:
        if node.op_type not in wanted:
            continue
        for t in (*node.input, *node.output):
            if t and t not in inits and t not in seen and elem.get(t, onnx.TensorProto.FLOAT) in _FLOAT_TYPES:
                seen.add(t)
                names.append(t)
    return names


def fixed_batch(model: onnx.ModelProto, axes: Mapping[str, int | None] | None = None) -> int | None:
    """The batch size every graph input fixes on its batch axis (``axes``: {input: axis, or None for an input
    without one}, as ``Samples.batch_axes``; default axis 0), or None if none fixes it. Such a model (an .onnx
    exported with a static batch, or a recurrent state fixed at batch 1) runs only in batches of exactly that
    size: calibration and checks use it. A free input follows the fixed ones."""
    inits = {i.name for i in model.graph.initializer}
    axes = axes or {}
    sizes = set()
    for inp in model.graph.input:
        axis = axes.get(inp.name, 0)
        if inp.name in inits or axis is None:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) > axis and dims[axis].HasField("dim_value") and dims[axis].dim_value > 0:
            sizes.add(dims[axis].dim_value)  # one input fixing its batch (a recurrent state at 1) fixes them all
    return sizes.pop() if len(sizes) == 1 else None


def calibrate(model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], tensors: Sequence[str], *,
              method: str = "minmax", batch_size: int = 16,
              progress: Callable[[int], None] | None = None) -> dict[str, tuple[float, float]]:
    """fp32 model + samples + tensor names → {tensor: (lo, hi)}, one streaming pass over the samples."""
    check_method(method)
    observers = {n: MinMaxObserver() if method == "minmax" else HistogramObserver(method) for n in tensors}
    for _, values in tap(model, samples, tensors, batch_size=batch_size, progress=progress):
        for name, value in values.items():
            if value.dtype.kind == "f":
                observers[name].update(value)
    return {n: obs.range() for n, obs in observers.items() if obs.seen}

