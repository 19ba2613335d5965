"""ONNX Runtime sessions on in-memory models, and samples → the batches they run on.

Every stage that runs a model (calibration, GPTQ, smoothing, the checks, the budget search) opens its CPU session
here, so the session options (log level, optimization level, threads) are set in one place."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx

__all__ = ["LEVELS", "batches", "input_dtypes", "np_dtype", "session"]

LEVELS = ("disable", "basic", "extended", "all")

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def session(model: onnx.ModelProto | str, *, level: str = "all", threads: int = 0,
            optimized_path: str | None = None, prepacking: bool = True):
    """An ONNX Runtime CPU session on an in-memory model (or a model file path). ``prepacking=False`` keeps
    ONNX Runtime from a second, pre-packed copy of the weights (for one streaming pass over a large model)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def np_dtype(ort_type: str) -> np.dtype:
    """ONNX Runtime's type string (``tensor(float)``) → the numpy dtype (float32 for anything unlisted)."""
    return np.dtype(_ORT_DTYPES.get(ort_type, "float32"))


def input_dtypes(sess) -> dict[str, np.dtype]:
    """A session → {input name: numpy dtype}."""
    return {i.name: np_dtype(i.type) for i in sess.get_inputs()}


def batches(samples: Sequence[dict[str, np.ndarray]], batch_size: int,
            dtypes: dict[str, np.dtype]) -> Iterator[dict[str, np.ndarray]]:
    """Samples → stacked batches, cast to the model's input dtypes."""
    for start in range(0, len(samples), batch_size):
        chunk = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
        yield {k: np.stack([s[k] for s in chunk]).astype(dtypes.get(k, chunk[0][k].dtype), copy=False)
               for k in chunk[0]}
