"""Latency measurement: models run interleaved (A, B, A, B, ...) on the same inputs, so that a noisy,
shared machine slows them alike and their ratio stays meaningful. Warm-up runs are excluded.

``bench`` is the verb behind ``edgequant bench``: a bundle's fp32 and int8 models (or one .onnx) per batch size
and thread count → p50/p90/p99, throughput, the int8/fp32 ratio of medians with the spread of per-round paired
ratios, and peak memory. ONNX Runtime's ``onnxruntime_perf_test`` (a C++ tool, not in the Python wheel)
times one model per process, so a comparison means two separate runs whose ratio drifts on a shared machine;
interleaving in one process is the part written here. Peak memory is measured in a fresh process per model
(``_memprobe.py``), since in-process RSS also counts every model loaded before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import BenchError

__all__ = ["BenchResult", "LatencyStats", "bench", "format_bench", "interleaved_latency", "interleaved_times",
           "latency_stats", "random_inputs"]


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


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Inputs for ``model`` with the batch axis (and any other free axis) set to ``batch``: floats N(0, 1),
    integers in [0, 100), booleans 0/1; drawn from ``rng`` (default: a generator seeded with ``seed``)."""
    rng = np.random.default_rng(seed) if rng is None else rng
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        high = 2 if dtype == np.bool_ else 100
        out[inp.name] = (rng.integers(0, high, shape) if dtype.kind in "iub" else rng.standard_normal(shape)).astype(dtype)
    return out


def interleaved_latency(models: Mapping[str, onnx.ModelProto | str], inputs: dict[str, np.ndarray], *,
                        threads: int = 1, runs: int = 50, warmup: int = 5, level: str = "all",
                        min_seconds: float = 0.0, provider: str = "CPUExecutionProvider") -> dict[str, LatencyStats]:
    """Each model (in memory or a path) on ``inputs``, interleaved ``runs`` times → latency stats by name."""
    times = interleaved_times(models, inputs, threads=threads, runs=runs, warmup=warmup, level=level,
                              min_seconds=min_seconds, provider=provider)
    return {name: latency_stats(ts) for name, ts in times.items()}


def latency_stats(times_ms: np.ndarray) -> LatencyStats:
    """Per-run latencies (ms) → percentiles, mean and spread."""
    a = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencyStats(float(p50), float(p90), float(p99), float(a.mean()), len(a),
                        float((p90 - p50) / p50) if p50 > 0 else 0.0)


def interleaved_times(models: Mapping[str, onnx.ModelProto | str], inputs: dict[str, np.ndarray], *,
                      threads: int = 1, runs: int = 50, warmup: int = 5, level: str = "all",
                      min_seconds: float = 0.0, provider: str = "CPUExecutionProvider") -> dict[str, np.ndarray]:
    """Each model on ``inputs``, interleaved (A B, B A, ...) → per-run latencies in ms by name, run i of every
    model taken in the same round (so ratios can be paired). Warm-up runs are excluded."""
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
        sessions[name] = ort.InferenceSession(src, so, providers=[provider])
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
    return {name: np.asarray(ts) for name, ts in times.items()}


MEMORY_NOTE = ("peak resident memory added by loading the model and running it (fresh process per model and "
               "batch, one thread; Python, numpy, onnxruntime and the inputs excluded): weights, pre-packed "
               "kernels, the memory arena and activations")


@dataclass(frozen=True)
class BenchResult:
    """Latency (and peak memory) of a bundle's fp32 and int8 models, or of one .onnx, per batch × threads."""

    name: str
    provider: str
    runs: int
    warmup: int
    rows: tuple[dict, ...]  # one per model × batch × threads
    ratios: tuple[dict, ...]  # int8 / fp32 per batch × threads (bundles only)
    environment: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "provider": self.provider, "runs": self.runs, "warmup": self.warmup,
                "environment": self.environment, "memory_measures": MEMORY_NOTE,
                "rows": list(self.rows), "ratios": list(self.ratios)}


def bench(model: str | Path, *, batches: Sequence[int] = (1,), threads: Sequence[int] = (1,),
          provider: str = "CPUExecutionProvider", runs: int = 50, warmup: int = 5,
          memory: bool = True) -> BenchResult:
    """A bundle folder (fp32 and int8 interleaved) or an .onnx file → latency p50/p90/p99, throughput and peak
    memory per batch size and thread count. Inputs are random, shaped by the model (batch axis = batch)."""
    from .progress import progress_bar

    models, name = _models_of(Path(model))
    provider = _provider(provider)
    for label, values in (("batch", batches), ("threads", threads)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise BenchError(f"{label} values must be positive integers, not {list(values)!r}")
    if runs < 1 or warmup < 0:
        raise BenchError(f"runs must be at least 1 and warm-up at least 0, not {runs} and {warmup}")
    proto = onnx.load(str(next(iter(models.values()))), load_external_data=False)
    rows, ratios = [], []
    configs = [(b, t) for b in batches for t in threads]
    for b, t in progress_bar(configs, desc="bench", unit="config", leave=False, disable=len(configs) < 2):
        inputs = _inputs_for(proto, b)
        times = interleaved_times(models, inputs, threads=t, runs=runs, warmup=warmup, provider=provider)
        for m, ts in times.items():
            st = latency_stats(ts)
            stats = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in st.__dict__.items()}
            rows.append({"model": m, "batch": b, "threads": t, **stats,
                         "throughput_per_s": round(b * 1e3 / st.p50_ms, 2)})  # at the median latency
        if "fp32" in times and "int8" in times:
            paired = times["int8"] / times["fp32"]
            p10, p90 = np.percentile(paired, [10, 90])
            ratios.append({"batch": b, "threads": t,
                           "int8_over_fp32_p50": float(f"{np.median(times['int8']) / np.median(times['fp32']):.6g}"),
                           "paired_ratio_p10": round(float(p10), 4), "paired_ratio_p90": round(float(p90), 4)})
    if memory:
        for m, path in models.items():
            for b in batches:
                peak = peak_memory_mib(path, _inputs_for(proto, b), provider=provider, runs=max(1, min(runs, 5)))
                for r in rows:
                    if r["model"] == m and r["batch"] == b:
                        r["peak_memory_mib"] = peak
    return BenchResult(name, provider, runs, warmup, tuple(rows), tuple(ratios), environment())


def peak_memory_mib(path: str | Path, inputs: dict[str, np.ndarray], *, provider: str = "CPUExecutionProvider",
                    runs: int = 5) -> float:
    """Peak resident memory (MiB) that loading ``path`` and running it on inputs shaped like ``inputs`` adds to
    a fresh process (see ``_memprobe.py``)."""
    spec = {"model": str(path), "provider": provider, "runs": runs,
            "inputs": {k: [list(v.shape), v.dtype.name] for k, v in inputs.items()}}
    probe = Path(__file__).with_name("_memprobe.py")
    proc = subprocess.run([sys.executable, str(probe), json.dumps(spec)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{path}: the memory probe failed: {last}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return round((out["peak_kib"] - out["baseline_kib"]) / 1024, 2)


def format_bench(result: dict) -> str:
    """A bench result (``BenchResult.to_dict()``) → a terminal table with ratios and how noisy the run was."""
    head = (f"{'model':<8} {'batch':>5} {'threads':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'items/s':>10} "
            f"{'peak MiB':>9} {'spread':>7}")
    lines = [f"bench    {result['name']}  ({result['provider']}, {result['runs']} interleaved runs each after "
             f"{result['warmup']} warm-up)", head, "-" * len(head)]
    for r in result["rows"]:
        mem = f"{r['peak_memory_mib']:>9.1f}" if "peak_memory_mib" in r else f"{'-':>9}"
        lines.append(f"{r['model']:<8} {r['batch']:>5} {r['threads']:>7} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['throughput_per_s']:>10.1f} {mem} {100 * r['spread']:>6.0f}%")
    for q in result["ratios"]:
        lines.append(f"ratio    batch {q['batch']}, {q['threads']} thread(s): int8/fp32 p50 "
                     f"{q['int8_over_fp32_p50']:.3f} (paired runs p10-p90 {q['paired_ratio_p10']:.3f}-"
                     f"{q['paired_ratio_p90']:.3f})")
    worst = max(r["spread"] for r in result["rows"])
    lines.append(f"noise    p90 is up to {100 * worst:.0f}% above p50 (spread); items/s is at the median latency; "
                 "compare medians and ratios, not single runs")
    return "\n".join(lines)


def _models_of(path: Path) -> tuple[dict[str, Path], str]:
    from .bundle.core import MANIFEST, load_bundle

    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise BenchError(f"{path} is neither an edgequant bundle ({MANIFEST} is missing) nor an .onnx file")
        b = load_bundle(path)
        models = {"fp32": b.fp32_model_path, "int8": b.model_path} if b.fp32_model_path else {"int8": b.model_path}
        return models, str(path)
    if path.is_file() and path.suffix == ".onnx":
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:  # onnx raises several types for a damaged file
            raise BenchError(f"{path} is not a valid ONNX model ({type(exc).__name__}); export it again") from None
        return {path.stem: path}, str(path)
    if not path.exists():
        raise BenchError(f"{path} does not exist: pass a bundle folder or an .onnx file")
    raise BenchError(f"{path} is neither an edgequant bundle folder nor an .onnx file")


def _provider(name: str) -> str:
    import onnxruntime as ort

    available = ort.get_available_providers()
    by_key = {p.lower(): p for p in available} | {p.lower().removesuffix("executionprovider"): p for p in available}
    found = by_key.get(name.lower())
    if found is None:
        raise BenchError(f"execution provider {name!r} is not available in this onnxruntime "
                         f"({ort.__version__}): use one of {', '.join(available)}")
    return found


def _inputs_for(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise BenchError(f"input {inp.name!r} has a fixed batch size of {dims[0].dim_value}: use --batch "
                             f"{dims[0].dim_value} (or export with a dynamic batch axis)")
    return random_inputs(model, batch)


def environment() -> dict:
    """The machine a measurement ran on: CPU name and its int8 features, cores, onnxruntime, Python, load."""
    import platform

    import onnxruntime as ort

    from ._runtime.edgequant_runtime import cpu_features, describe_cpu

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_features": describe_cpu(cpu_features()), "cores": os.cpu_count(), "onnxruntime": ort.__version__, "python": platform.python_version(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
