"""``method="auto"``: per tensor, the range among minmax/percentile/entropy/mse that gives the least model output
error on calibration samples (greedy, one sweep in graph order). One streaming pass fills one bounded histogram
per tensor, from which every method's range follows; the trials run on one session with the activation scales
and zero points as graph inputs (:mod:`edgequant.graph.trials`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from ..check.budget import run_outputs, sqnr_db
from ..graph.tap import tap
from ..graph.trials import as_inputs, init_arrays, runner
from .streaming import METHODS, HistogramObserver

__all__ = ["auto_ranges", "histograms"]

log = logging.getLogger(__name__)


def histograms(model: onnx.ModelProto, samples, tensors: Sequence[str], *, batch_size: int = 16,
               progress: Callable[[int], None] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """One streaming pass (one bounded histogram per tensor) → {tensor: {method: (lo, hi)}} for every method."""
    observers = {t: HistogramObserver("mse") for t in tensors}
    for _, values in tap(model, samples, tensors, batch_size=batch_size, progress=progress):
        for t, v in values.items():
            if v.dtype.kind == "f":
                observers[t].update(v)
    out = {}
    for t, obs in observers.items():
        if not obs.finite:
            out[t] = {method: obs.range() for method in METHODS}
        elif obs.seen:
            out[t] = {}
            for method in METHODS:
                obs.method = method
                out[t][method] = obs.range()
    return out


def auto_ranges(fp32: onnx.ModelProto, samples, tensors: Sequence[str], quantize_fn, *, batch_size: int = 16,
                limit: int = 64, progress: Callable[[int], None] | None = None
                ) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Per tensor, the range (among the calibration methods) with the least output error on calibration
    samples → ({tensor: (lo, hi)}, {tensor: method}). ``quantize_fn(ranges)`` → QDQ ModelProto."""
    cands = histograms(fp32, samples, tensors, batch_size=batch_size, progress=progress)
    subset = [samples[i] for i in range(min(limit, len(samples)))]
    ref = run_outputs(fp32, subset, batch_size=batch_size)
    # Quantize once per method; each model's activation scale/zero point per tensor are the trial values.
    per_method = {}
    for method in METHODS:
        per_method[method] = init_arrays(quantize_fn({t: r[method] for t, r in cands.items()}))
    base = quantize_fn({t: r["minmax"] for t, r in cands.items()})
    params = [(t, f"{t}_scale", f"{t}_zero_point") for t in cands
              if all(f"{t}_scale" in per_method[m] and f"{t}_zero_point" in per_method[m] for m in METHODS)]
    names = [p for t, sc, zp in params for p in (sc, zp)]
    outs = [o.name for o in fp32.graph.output]
    s, stacked = runner(as_inputs(base, names, []), subset, batch_size)

    def error(feeds) -> float:
        got = {n: np.concatenate([s.run([n], {**b, **feeds})[0] for b in stacked]) for n in outs}
        return -sqnr_db(ref, got)

    def feeds_for(choice):
        f = {}
        for t, sc, zp in params:
            f[sc], f[zp] = per_method[choice[t]][sc], per_method[choice[t]][zp]
        return f

    scores = {m: error(feeds_for({t: m for t, _, _ in params})) for m in METHODS}
    start = min(scores, key=scores.get)
    choice = {t: start for t, _, _ in params}
    best = scores[start]
    for t, sc, zp in params:
        for m in METHODS:
            cur, new = per_method[choice[t]], per_method[m]
            if m == choice[t] or (np.allclose(new[sc], cur[sc], rtol=0.01)
                                  and np.array_equal(new[zp], cur[zp])):
                continue
            trial = dict(choice, **{t: m})
            e = error(feeds_for(trial))
            if e < best - 1e-9:
                best, choice = e, trial
    chosen = {t: cands[t][choice.get(t, start)] for t in cands}
    picked = {t: choice.get(t, start) for t in cands}
    log.info("method auto: start %s (SQNR %.2f dB) → %.2f dB", start, -scores[start], -best)
    return chosen, picked
