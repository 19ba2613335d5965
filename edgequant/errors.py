"""The error tree: every failure a user can fix is an ``EdgeQuantError`` with a message that names the
file, tensor or node at fault and says how to fix it. The CLI prints ``error: <message>`` and exits 1."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

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
    "UsageError",
    "cli_spelling",
    "device_errors",
    "option",
    "spelled",
]

_FRONT_END: contextvars.ContextVar[str] = contextvars.ContextVar("edgequant_front_end", default="python")
_FLAG_OF = {"exclude_nodes": "exclude", "input_shapes": "input-shape", "batches": "batch"}
_NAME = object()


def option(name: str, value: object = _NAME) -> str:
    """A keyword argument of the Python API → how the user who called us spells it: ``option("force", True)`` is
    ``force=True`` from Python and ``--force`` from the command line, ``option("weights", "q4")`` is
    ``weights="q4"`` or ``--weights q4``, ``option("method")`` is ``method`` or ``--method``. Messages name the
    fix in the user's own words."""
    if _FRONT_END.get() == "cli":
        flag = "--" + _FLAG_OF.get(name, name).replace("_", "-")
        if isinstance(value, (list, tuple)):
            return " ".join(f"{flag} {v}" for v in value)
        return flag if value is _NAME or value is True else f"{flag} {value}"
    if value is _NAME:
        return name
    if isinstance(value, (list, tuple)):
        return f"{name}={list(value)!r}"
    return f'{name}="{value}"' if isinstance(value, str) else f"{name}={value!r}"


def spelled(*, cli: str, python: str) -> str:
    """The command-line or the Python form of a fix, for the front end that called us (see :func:`option`)."""
    return cli if _FRONT_END.get() == "cli" else python


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block, :func:`option` spells options as command-line flags (the CLI runs its commands here)."""
    token = _FRONT_END.set("cli")
    try:
        yield
    finally:
        _FRONT_END.reset(token)


@contextlib.contextmanager
def device_errors() -> Iterator[None]:
    """The one seam between the device adapter's errors and this tree: where edgequant calls the adapter
    (``runtimes/python/edgequant_runtime.py``, which cannot import edgequant), its BundleError becomes
    :class:`BundleError`, its InputError :class:`DataError`, any other of its errors :class:`EdgeQuantError`,
    with the adapter's message unchanged."""
    from ._runtime import edgequant_runtime as device

    try:
        yield
    except device.BundleError as exc:
        raise BundleError(str(exc)) from None
    except device.InputError as exc:
        raise DataError(str(exc)) from None
    except device.RuntimeAdapterError as exc:
        raise EdgeQuantError(str(exc)) from None


class EdgeQuantError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line."""


class UsageError(EdgeQuantError):
    """Options that do not fit together: one the chosen job does not take, or a malformed value. The CLI exits
    with 2 (a usage error), as for an unknown flag."""


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
