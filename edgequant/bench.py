"""Latency measurement: models run interleaved (A, B, A, B, ...) on the same inputs, so that a noisy,
shared machine slows them alike and their ratio stays meaningful. Warm-up runs are excluded."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["LatencyStats", "interleaved_latency", "random_inputs"]


@dataclass(frozen=True)
class LatencyStats:
    """Per-run wall-clock latency of one model, in milliseconds."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    spread: float  # (p90 - p50) / p50: how noisy the run was

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``model`` with the batch axis (and any other free axis) set to ``batch``."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        out[inp.name] = (rng.integers(0, 100, shape) if dtype.kind in "iu" else rng.standard_normal(shape)).astype(dtype)
    return out


def interleaved_latency(models: Mapping[str, onnx.ModelProto | str], inputs: dict[str, np.ndarray], *,
                        threads: int = 1, runs: int = 50, warmup: int = 5, level: str = "all",
                        min_seconds: float = 0.0) -> dict[str, LatencyStats]:
    """Each model (in memory or a path) on ``inputs``, interleaved ``runs`` times → latency stats by name."""
    import onnxruntime as ort

    sessions = {}
    for name, model in models.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if threads == 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        sessions[name] = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, inputs)
    start = time.perf_counter()
    i = 0
    while i < runs or time.perf_counter() - start < min_seconds:
        order = list(sessions.items()) if i % 2 == 0 else list(sessions.items())[::-1]
        for name, s in order:
            t = time.perf_counter()
            s.run(None, inputs)
            times[name].append((time.perf_counter() - t) * 1e3)
        i += 1
    out = {}
    for name, ts in times.items():
        a = np.asarray(ts)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        out[name] = LatencyStats(float(p50), float(p90), float(p99), float(a.mean()), len(a),
                                 float((p90 - p50) / p50) if p50 > 0 else 0.0)
    return out
