"""Which arithmetic the int8 graph is measured in: (target profile, this machine's CPU) → an ONNX Runtime
optimization level, recorded in the report as ``checked_with``.

The report must describe the device, not the build machine. ONNX Runtime computes one QDQ graph in two ways:
at level ``basic`` it keeps DequantizeLinear → float op → QuantizeLinear (the ONNX reference semantics, with
int8 values exact in float), which is what ARM's 32-bit int8 kernels, XNNPACK, TensorRT and NNAPI compute —
bit-identical to aarch64 onnxruntime on the digits bundles; at level ``all`` it fuses the groups into the
host's int8 kernels, and on x86 without VNNI those sum pairs of u8·s8 products in 16 bits and saturate with
full-range weights. So (see ``RuntimeSpec.arithmetic``):

- ``exact`` targets are measured at ``basic`` everywhere;
- ``host-kernels`` targets (7-bit weights, which cannot saturate) with the host's fused kernels;
- ``vnni-kernels`` targets with the host's fused kernels when the host has VNNI, at ``basic`` otherwise.

Host CPU features come from the device adapter's ``cpu_features`` (CPUID, so an emulated smaller CPU is seen
as what it is), the same function the device uses to refuse arithmetic it cannot do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .._runtime.edgequant_runtime import cpu_features, describe_cpu, int8_saturates
from ..targets import Target

__all__ = ["CheckedWith", "checked_with", "host_features", "host_would_differ"]

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
    return checked.arithmetic == "exact" and target.full_range_weights and int8_saturates(checked.host) \
        and target.runtime.cpu_int8_fusion
