"""edgequant: a trained PyTorch model in, a fast and accurate int8 ONNX bundle for edge devices out.

    model ─export─▶ fp32 ONNX ─calibrate─▶ ranges ─quantize─▶ QDQ ONNX ─check─▶ bundle ─▶ device runtime

``export`` builds a validated :class:`ExportConfig` and runs the job it selects (edgequant/jobs/__init__.py
lists each job's stages; ARCHITECTURE.md draws the whole pipeline).

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
    "ExportConfig",
    "ExportError",
    "FidelityError",
    "HFModel",
    "ImagePreprocess",
    "LayerRow",
    "QuantizationError",
    "Target",
    "TargetError",
    "UnsupportedOnTarget",
    "UsageError",
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
from .config import ExportConfig
from .errors import (BenchError, BudgetError, BundleError, CalibrationError, DataError, EdgeQuantError, ExportError,
                     FidelityError, QuantizationError, TargetError, UnsupportedOnTarget, UsageError)
from .frontend.hf import HFModel, load_hf
from .check.layers import LayerRow, layer_errors
from .inspection import inspect_bundle
from .targets import Target, list_targets, load_target
from . import qat  # noqa: E402  (quantization-aware training; imports torch only when used)


def __getattr__(name: str):
    if name == "LayerError":  # the per-layer row's former name: it is a data row, not an exception
        import warnings

        warnings.warn("edgequant.LayerError is now edgequant.LayerRow", DeprecationWarning, stacklevel=2)
        return LayerRow
    raise AttributeError(f"module 'edgequant' has no attribute {name!r}")
