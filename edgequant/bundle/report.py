"""The report (``report.json``): one schema for every job (PTQ, text, weight-only, QAT), so tools that read
reports need not know which job wrote one. Every report has every key of ``REPORT_KEYS``, in that order; a part
that does not apply to a job is ``null`` (documented in docs/report.md).

``schema_version`` counts incompatible changes of this layout (a key renamed, removed or changed in meaning);
adding a key does not change it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..version import __version__

__all__ = ["REPORT_KEYS", "REPORT_SCHEMA_VERSION", "holdout_block", "new_report", "sizes_block"]

REPORT_SCHEMA_VERSION = 1
REPORT_KEYS = ("schema_version", "edgequant_version", "bundle_digest", "source", "target", "method", "calibration",
               "holdout", "sizes", "fidelity", "fidelity_gate", "heads", "detection", "checked_with", "host_kernels",
               "kernels", "kernel_choices", "weights", "generation", "qat", "algorithms", "passes", "accuracy_budget",
               "layers", "timings")


def new_report(*, source: str, target: str, method: str, **parts: Any) -> dict[str, Any]:
    """The job's parts → a report with every key of REPORT_KEYS (those not given are None; the writer fills in
    ``bundle_digest``), in schema order.
    An unknown part is a programming error (a key every reader would miss), so it raises."""
    unknown = set(parts) - set(REPORT_KEYS)
    if unknown:
        raise KeyError(f"not report keys: {', '.join(sorted(unknown))} (add them to REPORT_KEYS)")
    given = {"schema_version": REPORT_SCHEMA_VERSION, "edgequant_version": __version__, "source": source,
             "target": target, "method": method, **parts}
    return {key: given.get(key) for key in REPORT_KEYS}


def sizes_block(fp32_bytes: bytes, int8_bytes: bytes) -> dict[str, Any]:
    """The two serialized models → the report's ``sizes`` part."""
    return {"fp32_bytes": len(fp32_bytes), "int8_bytes": len(int8_bytes),
            "ratio": round(len(int8_bytes) / len(fp32_bytes), 4)}


def holdout_block(holdout_ids: Sequence[str], calibration_ids: Sequence[str], total: int) -> dict[str, Any]:
    """The held-out and calibration samples' ids and the number of samples → the report's ``holdout`` part.
    Disjoint means: fewer held out than there are samples, and no held-out sample used for calibration."""
    return {"samples": len(holdout_ids),
            "disjoint_from_calibration": len(holdout_ids) < total and not set(holdout_ids) & set(calibration_ids)}
