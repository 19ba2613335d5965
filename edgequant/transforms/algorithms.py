"""Quantization algorithms beyond min/max, each an option of :class:`Algorithms`.

- ``equalize`` (cross-layer equalization, Nagel et al. 2019): for Conv A → (Relu | Clip(0, m) | nothing) →
  Conv B, output channel i of A is divided by s_i and input channel i of B multiplied by s_i, with
  s_i = sqrt(r1_i / r2_i) (r1, r2: the channels' weight ranges), so both get the range sqrt(r1_i · r2_i).
  Relu(x / s) = Relu(x) / s keeps the fp32 graph exact; a Clip(0, m) becomes Relu then Min with the
  per-channel bound m / s_i (Clip only takes scalars). It pays where weights are quantized per tensor
  (depthwise convolutions, whose channels have very different ranges).
- ``smooth_quant`` (Xiao et al. 2023): activation outliers of MatMuls with constant weights move into the
  weights; the statistics pass and the rewrite are :mod:`edgequant.transforms.smooth`'s (shared with the Hugging Face
  text path), the inserted float Muls stay out of int8.
- ``bias_correction`` (empirical): after quantization, each Conv/Gemm bias (int32) is corrected, in graph
  order, by the per-channel mean output shift E[y_int8] − E[y_fp32] on calibration samples.
- ``method="auto"``: per tensor, the range among minmax/percentile/entropy/mse that gives the least model
  output error on calibration samples (greedy, one sweep in graph order).

Each lives in the module of its stage (:mod:`.equalize`, :mod:`edgequant.quantize.bias_correction`,
:mod:`edgequant.calibration.auto`); this module holds the options and the SmoothQuant rewrite of the generic export.
The PTQ job runs equalization, SmoothQuant and bias correction as verified passes (:mod:`edgequant.graph.passes`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import onnx

from ..calibration.auto import auto_ranges
from ..errors import CalibrationError
from ..quantize.bias_correction import correct_bias
from .equalize import equalize_cross_layer
from .smooth import ALPHA, channel_ranges, smooth_graph, smoothable

__all__ = ["Algorithms", "auto_ranges", "correct_bias", "equalize_cross_layer", "smooth_quant"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Algorithms:
    """Which algorithms run on top of the calibration method (all off by default)."""

    equalize: bool = False
    bias_correction: bool = False
    smooth_quant: bool = False
    smooth_quant_alpha: float = ALPHA  # migration strength (see edgequant.smooth)
    max_samples: int = 64  # calibration samples used by bias correction and method="auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.smooth_quant_alpha < 1.0:
            raise CalibrationError(f"smooth_quant_alpha must be between 0 and 1, not {self.smooth_quant_alpha}")
        if self.max_samples < 1:
            raise CalibrationError(f"max_samples must be at least 1, not {self.max_samples}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ SmoothQuant
def smooth_quant(model: onnx.ModelProto, samples, *, alpha: float = ALPHA, batch_size: int = 16,
                 limit: int = 64, progress: Callable[[int], None] | None = None) -> tuple[onnx.ModelProto, int]:
    """fp32 ModelProto + samples → (a new ModelProto with activation outliers moved into MatMul weights,
    computing the same function, number of smoothed activations): per-channel ranges over at most ``limit``
    samples, then :func:`edgequant.transforms.smooth.smooth_graph`. Padding positions count here (no ``mask_input``): the
    generic check compares every output position, padded ones included."""
    tensors = smoothable(model)
    if not tensors:
        return model, 0
    subset = [samples[i] for i in range(min(limit, len(samples)))]
    stats = channel_ranges(model, subset, tensors, batch_size=batch_size, progress=progress)
    smoothed, _, count, _ = smooth_graph(model, stats, alpha=alpha)
    return smoothed, count
