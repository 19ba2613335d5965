"""Words and units shared by the terminal summary, ``inspect`` and the report page: byte sizes that scale
(B, KiB, MiB, GiB) and the name of what a bundle quantized (int8, or 4-/8-bit weights)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_bytes", "precision_label"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """A byte count → ``"512 B"``, ``"98.1 KiB"``, ``"86.2 MiB"``, ``"1.20 GiB"`` (powers of 1024, 3 significant
    digits from KiB up)."""
    n = float(n)
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    if unit == 0:
        return f"{int(n)} B"
    return f"{n:.2f} {_UNITS[unit]}" if abs(n) < 10 else f"{n:.1f} {_UNITS[unit]}"


def precision_label(report: dict[str, Any]) -> str:
    """A bundle report → what its quantized model stores: ``"int8"``, or ``"4-bit weights"`` for a weight-only
    bundle (whose activations stay float)."""
    weights = report.get("weights")
    if weights and weights.get("bits"):
        return f"{weights['bits']}-bit weights"
    return "int8"
