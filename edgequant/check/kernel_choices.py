"""Which of the target's kernel choices pay on one model: interleaved latencies of the int8 graph built with and
without each choice → the choices kept, their measured gain, and whether the chosen set beats plain int8.

The kernel choices are the profile keys that rewrite the graph for ONNX Runtime's fast int8 kernels
(``depthwise_channel_align``, ``input_channel_align``, ``int8_hardsigmoid``, ``softmax_inner_axis``;
docs/targets.md). Each pays on some
CPUs and models and costs on others (the RGB input spread to 8 channels multiplies a 7×7 stem's MACs by 2.7), so
where the build machine computes the target's kernels they are decided per model by timing:

    ratio(c) = q25(t(plain + c)) / q25(t(plain))

the lower quartiles of the two latencies (a busy machine only adds time, so the faster runs say what the model
itself costs), every variant run once per round (interleaved, batch 1, the target's threads) so that slow phases
of the machine hit all alike. A choice is kept when ratio(c) < 1 − max(MIN_GAIN, noise), noise being twice the
standard deviation of ratio(c) over the rounds resampled in pairs (bootstrap); a gain larger than MIN_GAIN that the
noise still hides is timed again and pooled. Then the kept set as a whole must not be slower than plain
(``ratio > 1 + noise``): if it is, plain is written and the report says why. A choice the user
set explicitly (a key in their own profile) is kept whatever it measures, with a warning that says what it costs.

Where the build machine does not compute the target's kernels (an ARM target, or a VNNI target on an AVX2 host),
:mod:`edgequant.check.kernel_cost` decides from MACs and the kernels' channel multiples instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CHOICES", "MIN_GAIN", "Decision", "KernelChoices", "Timer", "decide", "off", "paired_ratio"]

log = logging.getLogger(__name__)

# the profile keys (QuantSpec fields) that are kernel choices, and their "off" value
CHOICES: dict[str, Any] = {"depthwise_channel_align": 0, "input_channel_align": 0, "int8_hardsigmoid": False,
                           "softmax_inner_axis": False, "float_where_faster": False}
MIN_GAIN = 0.01  # a choice must save at least 1% of the latency, beyond the noise, to be kept
PLAIN, ALL = "plain", "all"
QUANTILE = 0.25  # a busy machine only adds time: the faster runs say what the model itself costs
_RESAMPLES = 200

# (models by name, inputs) → per-run latencies in ms by name, run i of each model in the same round
Timer = Callable[[Mapping[str, Any], dict[str, np.ndarray]], dict[str, np.ndarray]]


def off(key: str) -> Any:
    """A kernel choice's profile key → the value that turns it off."""
    return CHOICES[key]


def paired_ratio(with_ms: np.ndarray, without_ms: np.ndarray, q: float = QUANTILE) -> tuple[float, float]:
    """Per-round latencies of two interleaved models → (ratio of their lower-quartile latencies, noise: twice the
    standard deviation of that ratio over rounds resampled with their pairs kept, as a ratio)."""
    a, b = np.asarray(with_ms, np.float64), np.asarray(without_ms, np.float64)
    ratio = float(np.quantile(a, q) / np.quantile(b, q))
    idx = np.random.default_rng(0).integers(0, len(a), (_RESAMPLES, len(a)))
    boot = np.log(np.quantile(a[idx], q, axis=1) / np.quantile(b[idx], q, axis=1))
    return ratio, math.expm1(2 * float(np.std(boot)))


@dataclass(frozen=True)
class Decision:
    """One kernel choice on one model: kept or not, the measured (or modelled) latency ratio with it on / off."""

    key: str
    kept: bool
    ratio: float | None  # latency with the choice / without it (None: not applicable to this model)
    noise: float
    how: str  # "measured", "cost model", "explicit", "not applicable"
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kept": self.kept, "ratio": None if self.ratio is None else round(self.ratio, 4),
                "noise": round(self.noise, 4), "how": self.how, "why": self.why}


@dataclass(frozen=True)
class KernelChoices:
    """The decisions for one model, and the chosen set against plain int8 (no choices)."""

    decisions: tuple[Decision, ...]
    method: str  # "measured" (this machine computes the target's kernels) or "cost model"
    ratio_vs_plain: float | None  # the chosen set's latency / plain int8's (None: not measured)
    fallback: str | None  # why plain int8 was written instead of the kept set, or None
    host_cpu: str
    rounds: int = 0
    seconds: float = 0.0  # time spent building and timing the variants

    @property
    def kept(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.decisions if d.kept)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "host_cpu": self.host_cpu, "kept": list(self.kept),
                "decisions": [d.to_dict() for d in self.decisions],
                "ratio_vs_plain": None if self.ratio_vs_plain is None else round(self.ratio_vs_plain, 4),
                "fallback": self.fallback, "rounds": self.rounds, "seconds": round(self.seconds, 2)}


def _uncertain(ratio: float, noise: float) -> bool:
    """A gain larger than MIN_GAIN that the noise still hides."""
    return 1 - noise <= ratio < 1 - MIN_GAIN


def _keep(key: str, ratio: float, noise: float, explicit: bool) -> Decision:
    """A measured ratio → the decision for one choice (explicit choices are kept, with a warning when they cost)."""
    pays = ratio < 1 - max(MIN_GAIN, noise)
    if pays:
        return Decision(key, True, ratio, noise, "measured", f"{ratio:.3f}x the latency without it")
    if explicit:
        log.warning("%s is kept because the target profile sets it, but on this model it costs: %.3fx the latency "
                    "without it (remove the key from the profile to let the export decide)", key, ratio)
        return Decision(key, True, ratio, noise, "explicit", f"set in the profile; {ratio:.3f}x the latency "
                                                             "without it")
    return Decision(key, False, ratio, noise, "measured",
                    f"{ratio:.3f}x the latency without it (noise ±{noise:.3f}): does not pay")


def decide(variants: Mapping[str, Any], inputs: dict[str, np.ndarray], *, timer: Timer,
           build: Callable[[Sequence[str]], Any], explicit: Sequence[str] = (), host_cpu: str = "",
           not_applicable: Sequence[str] = (), max_extra: int = 2) -> KernelChoices:
    """Int8 graphs — ``"plain"`` (no choice), one per choice (plain + that choice, named by its key) and, with two
    or more choices, ``"all"`` — and the inputs to time them on → the decisions. ``timer`` runs them interleaved;
    ``build(keys)`` makes the graph of a kept set that was not among the variants (timed against plain once
    more). ``not_applicable``: choices that change nothing on this model (not timed). Where a gain beyond MIN_GAIN
    is not yet beyond the noise, the variants are timed again, up to ``max_extra`` times, and the rounds pooled."""
    keys = [k for k in variants if k not in (PLAIN, ALL)]
    times = timer(variants, inputs) if keys else {}
    for _ in range(max_extra):  # a busy machine: more rounds while a gain is larger than MIN_GAIN but not the noise
        if not any(_uncertain(*paired_ratio(times[k], times[PLAIN])) for k in keys):
            break
        more = timer(variants, inputs)
        times = {k: np.concatenate([times[k], more[k]]) for k in times}
    rounds = len(times.get(PLAIN, ()))
    decisions = [_keep(k, *paired_ratio(times[k], times[PLAIN]), k in explicit) for k in keys]
    decisions += [Decision(k, False, None, 0.0, "not applicable", "changes nothing on this model")
                  for k in not_applicable]
    kept = [d.key for d in decisions if d.kept]
    if not kept:
        return KernelChoices(tuple(decisions), "measured", 1.0, None, host_cpu, rounds)
    if len(kept) == 1:
        together = times[kept[0]]
    elif set(kept) == set(keys) and ALL in times:
        together = times[ALL]
    else:
        more = timer({PLAIN: variants[PLAIN], ALL: build(kept)}, inputs)
        together, times = more[ALL], {**times, PLAIN: more[PLAIN]}
    ratio, noise = paired_ratio(together, times[PLAIN])
    fallback = None
    if ratio > 1 + max(MIN_GAIN, noise) and any(d.key not in explicit for d in decisions if d.kept):
        fallback = (f"{', '.join(kept)} together ran {ratio:.3f}x plain int8's latency: plain written "
                    "(explicit choices kept)")
        log.warning("kernel choices: %s", fallback)
        decisions = [d if not d.kept or d.key in explicit else
                     Decision(d.key, False, d.ratio, d.noise, d.how, f"{d.why}, but not together with the others")
                     for d in decisions]
        ratio = None if any(d.kept for d in decisions) else 1.0
    return KernelChoices(tuple(decisions), "measured", ratio, fallback, host_cpu, rounds)
