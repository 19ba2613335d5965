"""Mixed precision under an accuracy budget: fp32 model + int8 model + held-out samples + budget → the int8
model with the fewest nodes kept in float for which the budget holds, and a report of what stayed in float,
why (measured sensitivity) and what it costs in latency.

ONNX Runtime's quantizer takes a list of nodes to leave in float (``nodes_to_exclude``) but does not choose
them; NNCF's accuracy-control loop needs its own validation dataset object and OpenVINO-specific ranking.
Here the choice is measured on the held-out samples:

1. sensitivity: each candidate node alone is kept in float (everything else int8) and the gain in output
   SQNR, 10·log10(Σ ref² / Σ (ref − q)²) in dB, against the all-int8 model is recorded;
2. search: nodes are added in order of sensitivity and the shortest prefix that meets the budget is found by
   bisection, every step verified by quantizing and measuring;
3. pruning: each chosen node, least sensitive first, is put back to int8 if the budget still holds.

A budget is decided on what the held-out samples say about unseen ones, not on their point value: the metric
is recomputed on 1,000 bootstrap resamples of the held-out samples (the same resamples for every trial, so
trials are compared pairwise) and a ``>=`` budget is met when the lower end of the 95% interval (2.5th
percentile) reaches the bound, a ``<=`` budget when the upper end (97.5th) does. With a few dozen samples the
interval is wide and the search keeps more nodes in float; more held-out data narrows it.

Budgets are ``metric>=bound`` or ``metric<=bound`` over the model outputs on the held-out samples:
``cosine`` (mean per-sample cosine, worst output), ``sqnr`` (dB, worst output), ``argmax`` (% agreement of
the first output's argmax with fp32), ``top1`` and ``top1-drop`` (% and points, first output vs labels), or a
Python function ``metric(fp32_outputs, int8_outputs, labels) -> float`` through the API.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..data.holdout import holdout_indices
from ..errors import BudgetError, DataError, option
from ..graph.sessions import batches, input_dtypes, session
from . import metrics

__all__ = ["CONFIDENCE", "METRICS", "RESAMPLES", "AccuracyBudget", "bootstrap_interval", "budget_labels",
           "keep_float_until", "run_outputs"]

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
MetricFn = Callable[[Outputs, Outputs, "np.ndarray | None"], float]

RESAMPLES = 1000
CONFIDENCE = 0.95

# Ops that move or select 8-bit values without arithmetic (ORT drops their Q/DQ): keeping one in float
# cannot reduce the error, so they are not candidates.
_NO_ERROR_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Relu", "Clip",
                           "Split", "Resize", "Gather", "Slice", "Expand", "Tile", "Identity"})


def _first(outputs: Outputs) -> np.ndarray:
    return next(iter(outputs.values()))


def _cosine(ref: Outputs, test: Outputs, labels: np.ndarray | None) -> float:
    return min((metrics.cosine(r, test[name]) for name, r in ref.items()), default=1.0)


def sqnr_db(ref: Outputs, test: Outputs, labels: np.ndarray | None = None) -> float:
    """Worst output's signal-to-quantization-noise ratio in dB (capped at 200 for identical outputs)."""
    return min((metrics.sqnr_db(r, test[name]) for name, r in ref.items()), default=metrics.MAX_SQNR_DB)


def _argmax(ref: Outputs, test: Outputs, labels: np.ndarray | None) -> float:
    agree = metrics.argmax_agreement(_first(ref), _first(test))
    if agree is None:
        raise BudgetError(f"the argmax budget needs a class-like first output (N, C>1), not {_first(ref).shape}")
    return 100.0 * agree


def _top1(ref: Outputs, test: Outputs, labels: np.ndarray | None) -> float:
    return 100.0 * metrics.top1(_first(test), labels)


def _top1_drop(ref: Outputs, test: Outputs, labels: np.ndarray | None) -> float:
    return _top1(ref, ref, labels) - _top1(ref, test, labels)


# name → (function, the comparison it allows, needs labels)
METRICS: dict[str, tuple[MetricFn, str, bool]] = {
    "argmax": (_argmax, ">=", False),
    "cosine": (_cosine, ">=", False),
    "sqnr": (sqnr_db, ">=", False),
    "top1": (_top1, ">=", True),
    "top1-drop": (_top1_drop, "<=", True),
}
_SYNTAX = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class AccuracyBudget:
    """``metric op bound``, e.g. ``AccuracyBudget("cosine", ">=", 0.995)`` or ``AccuracyBudget(my_fn, ">=", 97)``
    where ``my_fn(fp32_outputs, int8_outputs, labels) -> float`` (outputs: {name: array over the samples})."""

    metric: str | Callable
    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise BudgetError(f"accuracy budget comparison must be '>=' or '<=', not {self.op!r}")
        if not isinstance(self.bound, (int, float)) or not math.isfinite(self.bound):
            raise BudgetError(f"accuracy budget bound must be a finite number, not {self.bound!r}")
        if callable(self.metric):
            return
        if self.metric not in METRICS:
            raise BudgetError(f"unknown accuracy metric {self.metric!r}: use one of {', '.join(METRICS)} "
                              "(or a Python function through the API)")
        want = METRICS[self.metric][1]
        if self.op != want:
            raise BudgetError(f"accuracy budget {self.metric}{self.op}{self.bound:g} points the wrong way: "
                              f"write {self.metric}{want}{self.bound:g}")

    @classmethod
    def parse(cls, text: str) -> AccuracyBudget:
        """``"cosine>=0.995"`` → AccuracyBudget; a clear error on bad syntax."""
        m = _SYNTAX.match(text or "")
        if not m:
            raise BudgetError(f"accuracy budget {text!r} is not METRIC>=NUMBER or METRIC<=NUMBER, e.g. "
                              f"'cosine>=0.995' or 'top1-drop<=0.5' (metrics: {', '.join(METRICS)})")
        return cls(m.group(1).lower(), m.group(2), float(m.group(3)))

    @property
    def needs_labels(self) -> bool:
        return not callable(self.metric) and METRICS[self.metric][2]

    @property
    def name(self) -> str:
        return getattr(self.metric, "__name__", repr(self.metric)) if callable(self.metric) else self.metric

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.bound:g}"

    def measure(self, ref: Outputs, test: Outputs, labels: np.ndarray | None) -> float:
        """The metric on one pair of output sets; a failing or non-numeric user function is a BudgetError."""
        fn = self.metric if callable(self.metric) else METRICS[self.metric][0]
        try:
            value = float(fn(ref, test, labels))
        except Exception as exc:
            raise BudgetError(f"accuracy metric {self.name}() raised {type(exc).__name__}: {exc}; fix the "
                              "metric function (it gets fp32 outputs, int8 outputs, labels)") from exc
        if not math.isfinite(value):
            raise BudgetError(f"accuracy metric {self.name}() returned {value}: it must return a finite number")
        return value

    def holds(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def decisive(self, interval: tuple[float, float]) -> float:
        """The end of the interval the budget is decided on: the lower one for >=, the upper one for <=."""
        return interval[0] if self.op == ">=" else interval[1]


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) indices drawn with replacement, fixed by ``seed`` so that every trial sees the same ones."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(budget: AccuracyBudget, ref: Outputs, test: Outputs, labels: np.ndarray | None,
                       indices: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The metric over each resample of the samples (rows of ``indices``) → its percentile interval."""
    values = [budget.measure({k: v[i] for k, v in ref.items()}, {k: v[i] for k, v in test.items()},
                             None if labels is None else labels[i]) for i in indices]
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def run_outputs(model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], *,
                batch_size: int = 16, level: str = "all") -> Outputs:
    """A model on the samples (at ONNX Runtime ``level``) → {output name: outputs stacked over the samples}."""
    s = session(model, level=level)
    dtypes = input_dtypes(s)
    names = [o.name for o in s.get_outputs()]
    parts: dict[str, list] = {n: [] for n in names}
    for batch in batches(samples, batch_size, dtypes):
        for n, v in zip(names, s.run(names, batch)):
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def candidate_nodes(model: onnx.ModelProto, op_types: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Names of the nodes the quantizer would put in int8 whose own arithmetic can add error."""
    wanted = set(op_types) - _NO_ERROR_OPS
    skip = set(exclude)
    return [n.name for n in model.graph.node if n.op_type in wanted and n.name and n.name not in skip]


def keep_float_until(budget: AccuracyBudget, fp32: onnx.ModelProto, quantize_fn: Callable[[Sequence[str]], Any],
                     holdout: Sequence[dict[str, np.ndarray]], *, op_types: Sequence[str],
                     labels: np.ndarray | None = None, exclude: Sequence[str] = (), batch_size: int = 16,
                     latency_runs: int = 30, progress: bool = False,
                     level: str = "all") -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Budget + fp32 model + ``quantize_fn(float_nodes) -> int8 ModelProto`` + held-out samples → (int8 model
    with the fewest float nodes found that meets the budget, report dict). Raises BudgetError when even the
    fp32 model misses the budget."""
    from ..progress import progress_bar

    if budget.needs_labels:
        if labels is None:
            raise BudgetError(f"accuracy budget {budget} needs labels: pass {option('labels', 'labels.npy')} (one "
                              "integer class per calibration sample, in the order the samples are read)")
        if len(labels) != len(holdout):
            raise DataError(f"{len(labels)} labels for {len(holdout)} held-out samples; give one label per sample")
    ref = run_outputs(fp32, holdout, batch_size=batch_size)
    best = budget.measure(ref, ref, labels)
    if not budget.holds(best):
        raise BudgetError(f"accuracy budget {budget} cannot be met even with every node in float: the fp32 model "
                          f"scores {best:.6g} on {len(holdout)} held-out samples; loosen the budget")
    base_exclude = list(exclude)
    cache: dict[frozenset, tuple[onnx.ModelProto, Outputs]] = {}
    indices = resample_indices(len(holdout))
    intervals: dict[frozenset, tuple[float, float]] = {}

    def interval(nodes: Sequence[str]) -> tuple[float, float]:
        key = frozenset(nodes)
        if key not in intervals:
            intervals[key] = bootstrap_interval(budget, ref, trial(nodes)[1], labels, indices)
        return intervals[key]

    def trial(float_nodes: Sequence[str]) -> tuple[onnx.ModelProto, Outputs]:
        key = frozenset(float_nodes)
        if key not in cache:
            model = quantize_fn([*base_exclude, *float_nodes])
            cache[key] = (model, run_outputs(model, holdout, batch_size=batch_size, level=level))
        return cache[key]

    int8, out0 = trial([])
    value0 = budget.measure(ref, out0, labels)
    report: dict[str, Any] = {"budget": str(budget), "samples": len(holdout), "fp32_value": round(best, 6),
                              "all_int8_value": round(value0, 6), "all_int8_interval": _rounded(interval([])),
                              "confidence": CONFIDENCE, "resamples": RESAMPLES,
                              "decided_on": "lower" if budget.op == ">=" else "upper"}
    if budget.holds(budget.decisive(interval([]))):
        report.update(met=True, value=round(value0, 6), interval=_rounded(interval([])), float_nodes=[],
                      candidates=0, trials=len(cache))
        return int8, report

    candidates = candidate_nodes(fp32, op_types, base_exclude)
    sqnr0 = sqnr_db(ref, out0)
    gains: dict[str, float] = {}
    for name in progress_bar(candidates, desc="sensitivity", unit="node", disable=not progress, leave=False):
        gains[name] = sqnr_db(ref, trial([name])[1]) - sqnr0
    ranked = sorted(candidates, key=lambda n: -gains[n])

    def ok(nodes: Sequence[str]) -> tuple[bool, float]:
        bound = budget.decisive(interval(nodes))
        return budget.holds(bound), bound

    lo, hi = 0, len(ranked)  # prefix of length hi meets the budget (checked below), lo does not
    if not ok(ranked)[0]:
        end = "lower" if budget.op == ">=" else "upper"
        raise BudgetError(f"accuracy budget {budget} cannot be met: with all {len(ranked)} quantizable nodes in "
                          f"float the {end} end of the {100 * CONFIDENCE:.0f}% interval over {len(holdout)} "
                          f"held-out samples is {ok(ranked)[1]:.6g}; loosen the budget or give more data")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(ranked[:mid])[0]:
            hi = mid
        else:
            lo = mid
    chosen = ranked[:hi]
    for name in sorted(chosen, key=lambda n: gains[n]):  # least sensitive first
        rest = [n for n in chosen if n != name]
        if rest and ok(rest)[0]:
            chosen = rest
    final, outputs = trial(chosen)
    held, _ = ok(chosen)
    value = budget.measure(ref, outputs, labels)
    ops = {n.name: n.op_type for n in fp32.graph.node}
    report.update(
        met=held, value=round(value, 6), interval=_rounded(interval(chosen)), candidates=len(candidates),
        trials=len(cache),
        float_nodes=[{"node": n, "op_type": ops.get(n, "?"), "sqnr_gain_db": round(gains[n], 3)}
                     for n in sorted(chosen, key=lambda n: -gains[n])],
        sensitivity=[{"node": n, "op_type": ops.get(n, "?"), "sqnr_gain_db": round(gains[n], 3)}
                     for n in ranked[:20]],
        latency=_latency_cost(fp32, int8, final, latency_runs))
    log.info("accuracy budget %s: %d node(s) kept in float, %s = %.6g", budget, len(chosen), budget.name, value)
    return final, report


def _rounded(pair: tuple[float, float]) -> list[float]:
    return [round(pair[0], 6), round(pair[1], 6)]


def _latency_cost(fp32: onnx.ModelProto, int8: onnx.ModelProto, mixed: onnx.ModelProto,
                  runs: int) -> dict[str, Any]:
    """fp32, all-int8 and mixed models interleaved at batch 1 on one thread → p50s and ratios."""
    from ..bench import interleaved_latency, random_inputs

    if runs <= 0:
        return {}
    stats = interleaved_latency({"fp32": fp32, "int8": int8, "mixed": mixed}, random_inputs(fp32, 1),
                                threads=1, runs=runs, warmup=3)
    p = {k: v.p50_ms for k, v in stats.items()}
    return {"p50_ms": {k: round(v, 4) for k, v in p.items()}, "mixed_over_int8": round(p["mixed"] / p["int8"], 3),
            "mixed_over_fp32": round(p["mixed"] / p["fp32"], 3), "batch": 1, "threads": 1, "runs": runs,
            "noise": round(max(v.spread for v in stats.values()), 3)}


def labels_for(labels: Any, total: int, indices: Sequence[int]) -> np.ndarray | None:
    """Labels aligned with all samples (array or .npy path) → those at ``indices``; DataError on a mismatch."""
    if labels is None:
        return None
    if not isinstance(labels, np.ndarray):
        try:
            labels = np.load(labels, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read labels {labels}: {exc}; give a .npy file of integer classes") from None
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != total:
        raise DataError(f"labels hold {labels.shape[0]} entries but there are {total} samples; give one label "
                        "per sample, in the order the samples are read (sorted file names)")
    return labels[list(indices)]


def describe(report: Mapping[str, Any]) -> list[str]:
    """The budget part of a report → terminal lines."""
    lines = [f"budget   {report['budget']}: {'met' if report['met'] else 'NOT met'} "
             f"(all-int8 {report['all_int8_value']:.6g} -> {report['value']:.6g}, fp32 {report['fp32_value']:.6g}; "
             f"{report['trials']} trials on {report['samples']} held-out samples)"]
    if report.get("interval"):
        lo, hi = report["interval"]
        lines.append(f"budget   estimate {report['value']:.6g}, {100 * report['confidence']:.0f}% bootstrap interval "
                     f"{lo:.6g} .. {hi:.6g}: decided on its {report['decided_on']} end")
    for f in report.get("float_nodes", []):
        lines.append(f"float    {f['op_type']} {f['node']}: kept in fp32 (SQNR +{f['sqnr_gain_db']:.2f} dB alone)")
    lat = report.get("latency")
    if lat:
        lines.append(f"latency  mixed/int8 {lat['mixed_over_int8']:.3f}, mixed/fp32 {lat['mixed_over_fp32']:.3f} "
                     f"(batch 1, 1 thread, interleaved, noise {100 * lat['noise']:.0f}%)")
    return lines


def budget_labels(budget: AccuracyBudget, labels: Any, n: int) -> np.ndarray | None:
    """The held-out samples' labels (of ``n`` samples), checked before any work is done."""
    if budget.needs_labels and labels is None:
        raise BudgetError(f"accuracy budget {budget} needs labels: pass {option('labels', 'labels.npy')} (one "
                          "integer class per calibration sample, in the order the samples are read)")
    return labels_for(labels, n, holdout_indices(n))
