"""Which arithmetic the int8 graph is measured in: (target profile, this machine's CPU) → an ONNX Runtime
optimization level, recorded in the report as ``checked_with``.

The report must describe the device, not the build machine. ONNX Runtime computes one QDQ graph in two ways:
at level ``basic`` it keeps DequantizeLinear → float op → QuantizeLinear (the ONNX reference semantics, with
int8 values exact in float), which is what ARM's 32-bit int8 kernels, XNNPACK, TensorRT and NNAPI compute —
bit-identical to aarch64 onnxruntime on the digits bundles; at level ``all`` it fuses the groups into the
host's int8 kernels, and on x86 without VNNI those sum pairs of u8·s8 products in 16 bits and saturate with
full-range weights. So (see ``RuntimeSpec.arithmetic``):

- ``exact`` targets are measured at ``basic`` everywhere;
- ``host-kernels`` targets (weights whose pair sums cannot saturate: 7-bit, or per channel with
  ``pair_saturation``) with the host's fused kernels;
- ``vnni-kernels`` targets with the host's fused kernels when the host has VNNI, at ``basic`` otherwise.

This module also opens every CPU session the stages run (calibration, GPTQ, smoothing, the checks, the budget
search), so the session options (log level, optimization level, threads) are set in one place, and turns
samples into the batches they run on.

Host CPU features come from the device adapter's ``cpu_features`` (CPUID, so an emulated smaller CPU is seen
as what it is), the same function the device uses to refuse arithmetic it cannot do.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .._runtime.edgequant_runtime import cpu_features, describe_cpu, int8_saturates
from ..targets import Target

__all__ = ["LEVELS", "CheckedWith", "batch_axes_of", "batch_step", "batches", "checked_with", "host_features",
           "host_would_differ", "input_dtypes", "np_dtype", "session"]

EXACT_LEVEL = "basic"


@functools.lru_cache(maxsize=1)
def _host() -> tuple[str, tuple[str, ...], str]:
    f = cpu_features()
    return f["arch"], tuple(f["flags"]), f["source"]


def host_features() -> dict[str, Any]:
    """This machine's CPU: {"arch", "flags", "source"} (read once per process)."""
    arch, flags, source = _host()
    return {"arch": arch, "flags": list(flags), "source": source}


@dataclass(frozen=True)
class CheckedWith:
    """How the int8 graph was run for every figure of one export."""

    arithmetic: str  # "exact" or "host-kernels": what was computed
    level: str  # the ONNX Runtime graph optimization level of the int8 sessions
    profile_arithmetic: str  # what the profile says the target computes
    host: dict[str, Any]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"arithmetic": self.arithmetic, "onnxruntime_level": self.level,
                "profile_arithmetic": self.profile_arithmetic, "host_cpu": dict(self.host),
                "host_cpu_label": describe_cpu(self.host), "reason": self.reason}

    def line(self) -> str:
        """One summary line."""
        return f"checked  in {self.arithmetic} arithmetic (onnxruntime level {self.level}) on {describe_cpu(self.host)}: " \
               f"{self.reason}"


def checked_with(target: Target, features: dict[str, Any] | None = None) -> CheckedWith:
    """Target profile + host CPU features (default: this machine's) → how to run its int8 graph."""
    host = features if features is not None else host_features()
    kind = target.runtime.arithmetic
    host_level = target.runtime.graph_optimization_level
    vnni = host.get("arch") == "x86_64" and not int8_saturates(host)
    if kind == "host-kernels":
        return CheckedWith("host-kernels", host_level, kind, host,
                           f"{target.name}'s weights cannot saturate, so this machine's fused kernels compute what "
                           "the device does")
    if kind == "vnni-kernels" and vnni:
        return CheckedWith("host-kernels", host_level, kind, host,
                           f"this machine has VNNI, like every CPU {target.name} is for")
    why = ("this machine has no VNNI; the target's VNNI kernels compute exact int8 sums" if kind == "vnni-kernels"
           else f"{target.name}'s kernels sum in 32 bits; level basic equals aarch64 onnxruntime bit for bit")
    return CheckedWith("exact", EXACT_LEVEL, kind, host, why)


def host_would_differ(target: Target, checked: CheckedWith) -> bool:
    """True when this machine's own fused kernels would compute the bundle differently from the target: an x86
    host without VNNI and a bundle with full-range 8-bit weights that was checked in exact arithmetic."""
    return checked.arithmetic == "exact" and target.needs_vnni_on_x86 and int8_saturates(checked.host)


LEVELS = ("disable", "basic", "extended", "all")

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def session(model: onnx.ModelProto | str, *, level: str = "all", threads: int = 0,
            optimized_path: str | None = None, prepacking: bool = True, arena: bool = True,
            profile_prefix: str | None = None):
    """An ONNX Runtime CPU session on an in-memory model (or a model file path). ``prepacking=False`` keeps
    ONNX Runtime from a second, pre-packed copy of the weights (for one streaming pass over a large model).
    ``arena=False`` for passes over many batches (calibration, the checks): ONNX Runtime's arena keeps every
    block it ever grew to and, fragmented batch after batch, grows with the number of samples; without it
    each batch's buffers go back to the allocator. ``profile_prefix``: ONNX Runtime's per-node profiling on, its
    JSON written there (``end_profiling()`` returns the path)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 4  # its errors come back as exceptions, which the stages turn into one line
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def np_dtype(ort_type: str) -> np.dtype:
    """ONNX Runtime's type string (``tensor(float)``) → the numpy dtype (float32 for anything unlisted)."""
    return np.dtype(_ORT_DTYPES.get(ort_type, "float32"))


def input_dtypes(sess) -> dict[str, np.dtype]:
    """A session → {input name: numpy dtype}."""
    return {i.name: np_dtype(i.type) for i in sess.get_inputs()}


def batch_axes_of(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, int | None]:
    """Samples → {input: the axis its batches stack along, or None: fed as given} (``Sample.batch_axes``;
    empty, i.e. axis 0 for every input, for plain dicts)."""
    return dict(getattr(samples[0], "batch_axes", {})) if len(samples) else {}


def batch_step(samples: Sequence[dict[str, np.ndarray]], batch_size: int) -> int:
    """How many samples one batch holds: ``batch_size``, or 1 where an input has no batch axis."""
    return 1 if None in batch_axes_of(samples).values() else batch_size


def batches(samples: Sequence[dict[str, np.ndarray]], batch_size: int,
            dtypes: dict[str, np.dtype]) -> Iterator[dict[str, np.ndarray]]:
    """Samples → stacked batches, cast to the model's input dtypes. Each input stacks along its batch axis
    (:func:`batch_axes_of`); an input without one is fed as given, one sample per batch."""
    axes = batch_axes_of(samples)
    step = batch_step(samples, batch_size)
    for start in range(0, len(samples), step):
        chunk = [samples[i] for i in range(start, min(start + step, len(samples)))]
        yield {k: (np.asarray(chunk[0][k]) if axes.get(k, 0) is None else np.stack([s[k] for s in chunk],
                                                                                 axis=axes.get(k, 0)))
               .astype(dtypes.get(k, chunk[0][k].dtype), copy=False) for k in chunk[0]}
