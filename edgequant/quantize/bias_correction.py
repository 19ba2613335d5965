"""Bias correction (empirical): after quantization, each Conv/Gemm bias (int32) is corrected, in graph order, by
the per-channel mean output shift E[y_int8] − E[y_fp32] on calibration samples, measured on one session with
the biases as graph inputs (:mod:`edgequant.graph.trials`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.index import consumers, producers
from ..graph.trials import as_inputs, init_arrays, runner

__all__ = ["correct_bias"]

log = logging.getLogger(__name__)


def correct_bias(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples, *, batch_size: int = 16,
                 limit: int = 64) -> tuple[onnx.ModelProto, int]:
    """fp32 + QDQ model + calibration samples → (a new QDQ model whose int32 biases cancel the mean output
    shift of each Conv/Gemm, number of corrected nodes). b' = b − (E[y_int8] − E[y_fp32]) per channel."""
    inits = init_arrays(int8)
    producer = producers(int8.graph)
    users = consumers(int8.graph)
    fp32_values = producers(fp32.graph)
    todo = []  # (fp32 tensor, its int8 counterpart, int32 bias initializer, bias scale)
    for node in int8.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.output[0] not in fp32_values:
            continue
        dq = producer.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
                or inits[dq.input[0]].dtype != np.int32 or dq.input[1] not in inits:
            continue
        todo.append((node.output[0], _after_qdq(node.output[0], users), dq.input[0],
                     inits[dq.input[1]].astype(np.float64)))
    if not todo:
        return int8, 0
    subset = [samples[i] for i in range(min(limit, len(samples)))]
    outs = [t[0] for t in todo]
    ref_s, ref_batches = runner(as_inputs(fp32, [], outs), subset, batch_size)
    ref_mean = _channel_means(ref_s, ref_batches, outs, {})
    work = as_inputs(int8, [t[2] for t in todo], [t[1] for t in todo])
    s, stacked = runner(work, subset, batch_size)
    feeds = {t[2]: inits[t[2]].copy() for t in todo}
    for out, qout, bias_name, scale in todo:
        mean_q = _channel_means(s, stacked, [qout], feeds)[qout]
        shift = mean_q - ref_mean[out]
        bias = feeds[bias_name].astype(np.float64) * scale - shift
        feeds[bias_name] = np.clip(np.round(bias / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
    result = onnx.ModelProto()
    result.CopyFrom(int8)
    for init in result.graph.initializer:
        if init.name in feeds:
            init.CopyFrom(numpy_helper.from_array(feeds[init.name], init.name))
    log.info("corrected the biases of %d Conv/Gemm nodes", len(todo))
    return result, len(todo)


def _after_qdq(name: str, users: Mapping[str, list[onnx.NodeProto]]) -> str:
    """The value the int8 graph really passes on for ``name``: the DQ(Q(name)) output where there is one (the
    quantizer may have dropped an activation there, the Q's range clipping in its place)."""
    for q in users.get(name, []):
        if q.op_type == "QuantizeLinear":
            for dq in users.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return dq.output[0]
    return name


def _channel_means(s, stacked, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of ``names`` over all batches."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in stacked:
        for n, v in zip(names, s.run(list(names), {**batch, **feeds})):
            flat = np.moveaxis(v.astype(np.float64), 1, 0).reshape(v.shape[1], -1)
            sums[n] = sums.get(n, 0) + flat.sum(axis=1)
            counts[n] = counts.get(n, 0) + flat.shape[1]
    return {n: v / counts[n] for n, v in sums.items()}
