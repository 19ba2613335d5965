"""The PTQ stage that decides the target's kernel choices per model (``depthwise_channel_align``,
``input_channel_align``, ``int8_hardsigmoid``, ``softmax_inner_axis``, ``float_where_faster``): the model built
with and without each → the choices that pay, written into ``run.target`` (and ``run.kernel_float``) so that the
fp32 passes and the quantizer that follow apply only those.

Each variant is built the way the export builds its graph — PTQ's own fp32 passes, calibration and quantization,
run on a copy of the run whose target has a changed ``quantization`` — but calibrated with minmax on a few samples
and without bias correction: latency does not depend on the exact scales. Where this machine computes the target's
kernels (``checked_with`` is host-kernels: generic-cpu and x86-avx2 everywhere, x86-vnni on a VNNI host) the
variants are timed with ONNX Runtime (edgequant.check.kernel_choices); elsewhere the fp32 variants go to the cost
model (edgequant.check.kernel_cost). The report's ``kernel_choices`` part records the decisions and gains.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from ..bench import interleaved_times
from ..check.kernel_choices import CHOICES, PLAIN, Decision, KernelChoices, Timer, decide, off
from ..check.kernel_cost import FAMILY_MULTIPLE, decide_by_cost
from ..check.node_times import slower_in_int8
from ..graph.sessions import batches
from ..targets import RuntimeSpec
from . import ptq
from .stages import Run

__all__ = ["CALIBRATION_SAMPLES", "MIN_ROUNDS", "TIMING_SECONDS", "batch_one", "kernel_choices", "timer_for"]

log = logging.getLogger(__name__)

FLOAT = "float_where_faster"  # decided from per-node profiles, then timed like the others
CALIBRATION_SAMPLES = 4  # minmax ranges of the variants (timing does not depend on the exact scales)
MIN_ROUNDS = 20  # interleaved rounds at least ...
TIMING_SECONDS = 3.0  # ... and at least this long


def _variant(run: Run, keys: Sequence[str], candidates: Sequence[str], floats: Sequence[str] = ()) -> Run:
    """The run with only ``keys`` of the kernel choices on (``floats``: the nodes ``float_where_faster`` keeps
    float) → a copy whose fp32 passes have run."""
    cfg, q = run.config, run.target.quantization
    cfg = replace(cfg, progress=False, calibration=replace(cfg.calibration, method="minmax"),
                  algorithms=replace(cfg.algorithms, bias_correction=False))
    step = run.fixed_batch or 1
    n = min(len(run.calib), max(step, CALIBRATION_SAMPLES - CALIBRATION_SAMPLES % step))
    quant = replace(q, **{k: off(k) for k in candidates if k not in keys})
    v = replace(run, config=cfg, target=replace(run.target, quantization=quant), calib=run.calib.subset(range(n)),
                parts={}, timings={}, files={}, kernel_float=tuple(floats) if FLOAT in keys else ())
    ptq.fp32_passes(v)
    return v


def _int8(v: Run) -> onnx.ModelProto:
    """A variant after its fp32 passes → its int8 graph (PTQ's calibration and quantization)."""
    for stage in (ptq.calibrate, ptq.heads, ptq.quantize):
        stage(v)
    return v.int8


def batch_one(run: Run) -> dict[str, np.ndarray]:
    """The first calibration sample as a batch (of 1, or of the model's fixed batch), each input stacked along its
    own batch axis (a recurrent state or a scalar fed as given)."""
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in run.fp32.graph.input}
    n = run.fixed_batch or 1
    return next(batches([run.calib[i] for i in range(n)], n, types))


def _threads(run: Run) -> int:
    return run.target.runtime.intra_op_num_threads or 1  # 1 where the target lets ONNX Runtime choose


def timer_for(runtime: RuntimeSpec) -> Timer:
    """A target's runtime (its threads, 1 where it lets ONNX Runtime choose, and optimization level) → an
    interleaved timer."""
    return functools.partial(_time, threads=runtime.intra_op_num_threads or 1, level=runtime.graph_optimization_level)


def _timer(run: Run) -> Timer:
    return timer_for(run.target.runtime)


def _why_float(d: Decision, floats: Sequence[str], profiled: dict | None) -> Decision:
    """The float_where_faster decision, saying which nodes (or that no node is slower in int8)."""
    if d.key != FLOAT or profiled is None:
        return d
    if not floats:
        return replace(d, why=f"int8 is faster than float at all {profiled['profiled_nodes']} profiled nodes")
    names = ", ".join(floats[:4]) + (f" and {len(floats) - 4} more" if len(floats) > 4 else "")
    return replace(d, why=f"{len(floats)} nodes in float ({names}): {d.why}")


def _time(models, inputs, *, threads: int, level: str) -> dict[str, np.ndarray]:
    return interleaved_times(models, inputs, threads=threads, runs=MIN_ROUNDS, warmup=3, level=level,
                             min_seconds=TIMING_SECONDS)


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    return a.graph.SerializeToString(deterministic=True) == b.graph.SerializeToString(deterministic=True)


def kernel_choices(run: Run, timer: Timer | None = None) -> None:
    """The target's kernel choices that are on → those that pay on this model (measured on this machine where it
    computes the target's kernels, else the cost model); ``run.target`` keeps only those, and the report's
    ``kernel_choices`` part says what was chosen and why."""
    tgt = run.target
    candidates = [k for k in CHOICES if getattr(tgt.quantization, k) != off(k)]
    if not candidates:
        run.parts["kernel_choices"] = None
        return
    t0 = time.perf_counter()
    explicit = [k for k in candidates if k in tgt.explicit]
    host = run.checked.to_dict()["host_cpu_label"]
    measured = run.checked.arithmetic == "host-kernels"
    plain = _variant(run, (), candidates)
    hsig = any(n.op_type in ("HardSigmoid", "HardSwish") for n in plain.work.graph.node)
    singles = {k: _variant(run, (k,), candidates) for k in candidates
               if (k != "int8_hardsigmoid" or hsig) and k != FLOAT}
    applicable = {k: v for k, v in singles.items() if k == "int8_hardsigmoid" or not _same(v.work, plain.work)}
    plain_int8, floats, profiled = None, [], None
    if FLOAT in candidates and measured:
        plain_int8 = _int8(plain)
        try:
            slower, matched = slower_in_int8(plain.work, plain_int8, batch_one(run), threads=_threads(run),
                                             level=tgt.runtime.graph_optimization_level)
        except Exception as exc:  # a speed choice never ends an export: the graphs stay as plain int8 places them
            log.warning("float_where_faster: the per-node profiles failed (%s: %s); every node stays int8",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            slower, matched = [], []
        floats, profiled = [t.node for t in slower], {"slower_in_int8": [t.to_dict() for t in slower],
                                                      "profiled_nodes": len(matched)}
        if floats:
            applicable[FLOAT] = _variant(run, (FLOAT,), candidates, floats)
    elif FLOAT in candidates:
        applicable[FLOAT] = plain  # the cost model says why it is off
    skipped = [k for k in candidates if k not in applicable]
    if not applicable:
        result = KernelChoices(
            tuple(Decision(k, False, None, 0.0, "not applicable", "changes nothing on this model") for k in skipped),
            "measured" if measured else "cost model", None, None, host)
    elif measured:
        # the kept set, when it is two or more choices, is built afterwards (a build costs more than a timing)
        variants: dict[str, Any] = {PLAIN: plain_int8 or _int8(plain),
                                    **{k: _int8(v) for k, v in applicable.items()}}
        result = decide(variants, batch_one(run), timer=timer or _timer(run),
                        build=lambda keys: _int8(_variant(run, keys, candidates, floats)), explicit=explicit,
                        host_cpu=host, not_applicable=skipped)
    else:
        shapes = {k: v.shape for k, v in batch_one(run).items()}
        family = "arm64" if tgt.runtime.arithmetic == "exact" else "x86_64"
        result = decide_by_cost({PLAIN: plain.work, **{k: v.work for k, v in applicable.items()}}, shapes,
                                FAMILY_MULTIPLE[family], explicit=explicit, host_cpu=host, not_applicable=skipped)
    result = replace(result, seconds=time.perf_counter() - t0)
    if FLOAT in result.kept:
        run.kernel_float = tuple(floats)
    result = replace(result, decisions=tuple(_why_float(d, floats, profiled) for d in result.decisions))
    # a choice that does not pay is switched off; one that changes nothing stays as asked, except the float nodes,
    # which the manifest lists as done only where some node is float
    dropped = {d.key: off(d.key) for d in result.decisions
               if not d.kept and (d.how != "not applicable" or d.key == FLOAT)}
    if dropped:
        run.target = replace(tgt, quantization=replace(tgt.quantization, **dropped))
    run.parts["kernel_choices"] = {**result.to_dict(), **({"float_where_faster": profiled} if profiled else {})}
    log.info("kernel choices (%s, %.1f s): kept %s", result.method, result.seconds, ", ".join(result.kept) or "none")
