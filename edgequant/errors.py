"""The error tree: every failure a user can fix is an ``EdgeQuantError`` with a message that names the
file, tensor or node at fault and says how to fix it. The CLI prints ``error: <message>`` and exits 1."""

from __future__ import annotations

__all__ = [
    "BenchError",
    "BudgetError",
    "BundleError",
    "CalibrationError",
    "DataError",
    "EdgeQuantError",
    "ExportError",
    "FidelityError",
    "QuantizationError",
    "TargetError",
    "UnsupportedOnTarget",
]


class EdgeQuantError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""


class DataError(EdgeQuantError):
    """Calibration or evaluation data cannot be read or does not fit the model."""


class ExportError(EdgeQuantError):
    """The model cannot be loaded or exported to ONNX."""


class TargetError(EdgeQuantError):
    """A target profile is unknown or malformed."""


class CalibrationError(EdgeQuantError):
    """Calibration produced no usable ranges (NaN activations, a tensor never seen, ...)."""


class QuantizationError(EdgeQuantError):
    """The quantized graph is not what the target needs (absurd scales, float layers left, ...)."""


class FidelityError(QuantizationError):
    """The int8 model is grossly wrong on the held-out samples (a destroyed output or part of one)."""


class UnsupportedOnTarget(QuantizationError):
    """An op or dtype the target's execution provider cannot run in int8."""


class BundleError(EdgeQuantError):
    """A bundle is missing, tampered with, from a newer schema, or cannot be written."""


class BenchError(EdgeQuantError):
    """A benchmark cannot run as asked: not a model, an unknown execution provider, a batch the model refuses."""


class BudgetError(QuantizationError):
    """An accuracy budget that is malformed, cannot be met, or whose metric function fails."""
