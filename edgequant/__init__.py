"""edgequant: a trained PyTorch model in, a fast and accurate int8 ONNX bundle for edge devices out.

    model ─export─▶ fp32 ONNX ─calibrate─▶ ranges ─quantize─▶ QDQ ONNX ─verify─▶ bundle ─▶ device runtime

Importing edgequant does not import torch; the export stage does, when it runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "AccuracyBudget",
    "Algorithms",
    "BudgetError",
    "Bundle",
    "BundleError",
    "CalibrationError",
    "DataError",
    "EdgeQuantError",
    "ExportError",
    "ImagePreprocess",
    "QuantizationError",
    "Target",
    "TargetError",
    "UnsupportedOnTarget",
    "export",
    "list_targets",
    "load_bundle",
    "load_target",
]

from .algorithms import Algorithms
from .api import export
from .budget import AccuracyBudget
from .bundle import Bundle, load_bundle
from .data import ImagePreprocess
from .errors import BudgetError
from .errors import (BundleError, CalibrationError, DataError, EdgeQuantError, ExportError, QuantizationError,
                     TargetError, UnsupportedOnTarget)
from .targets import Target, list_targets, load_target

