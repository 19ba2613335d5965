"""edgequant: a trained PyTorch model in, a fast and accurate int8 ONNX bundle for edge devices out.

    model ─export─▶ fp32 ONNX ─calibrate─▶ ranges ─quantize─▶ QDQ ONNX ─verify─▶ bundle ─▶ device runtime

Importing edgequant does not import torch; the export stage does, when it runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "BundleError",
    "CalibrationError",
    "DataError",
    "EdgeQuantError",
    "ExportError",
    "HFModel",
    "ImagePreprocess",
    "QuantizationError",
    "Target",
    "TargetError",
    "UnsupportedOnTarget",
    "export",
    "list_targets",
    "load_bundle",
    "load_hf",
    "load_target",
]

from .api import export
from .bundle import Bundle, load_bundle
from .data import ImagePreprocess
from .errors import (BundleError, CalibrationError, DataError, EdgeQuantError, ExportError, QuantizationError,
                     TargetError, UnsupportedOnTarget)
from .hf import HFModel, load_hf
from .targets import Target, list_targets, load_target

