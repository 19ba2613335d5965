"""edgequant: a trained PyTorch model in, a fast and accurate int8 ONNX bundle for edge devices out.

    model ─export─▶ fp32 ONNX ─calibrate─▶ ranges ─quantize─▶ QDQ ONNX ─verify─▶ bundle ─▶ device runtime

Importing edgequant does not import torch; the export stage does, when it runs.
"""

from __future__ import annotations

from .version import __version__  # noqa: F401

__all__ = [
    "AccuracyBudget",
    "Algorithms",
    "BenchError",
    "BenchResult",
    "BudgetError",
    "Bundle",
    "BundleError",
    "CalibrationError",
    "DataError",
    "EdgeQuantError",
    "ExportError",
    "HFModel",
    "ImagePreprocess",
    "LayerError",
    "QuantizationError",
    "Target",
    "TargetError",
    "UnsupportedOnTarget",
    "bench",
    "export",
    "inspect_bundle",
    "layer_errors",
    "list_targets",
    "load_bundle",
    "load_hf",
    "load_target",
    "qat",
]

from .transforms.algorithms import Algorithms
from .jobs import export
from .bench import BenchResult, bench
from .check.budget import AccuracyBudget
from .bundle.core import Bundle, load_bundle
from .data.samples import ImagePreprocess
from .errors import (BenchError, BudgetError, BundleError, CalibrationError, DataError, EdgeQuantError, ExportError,
                     QuantizationError, TargetError, UnsupportedOnTarget)
from .frontend.hf import HFModel, load_hf
from .check.layers import LayerError, layer_errors
from .inspection import inspect_bundle
from .targets import Target, list_targets, load_target
from . import qat  # noqa: E402  (quantization-aware training; imports torch only when used)

