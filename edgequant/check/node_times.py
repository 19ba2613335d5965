"""Where int8 is slower than float, node by node: ONNX Runtime's own profiles of the plain int8 graph and of the fp32
graph it was built from → the Conv/Gemm/MatMul nodes whose fused int8 kernel takes longer than the float kernel
plus what running that node in float adds around it.

MLAS's int8 kernels do not beat float everywhere: an RGB stem (3 input channels) goes through im2col and the int8
GEMM, 1.7-1.8× the float NCHWc convolution on EfficientNet-Lite0 and MobileNetV3-Large, and on AVX2 without VNNI
several depthwise and small pointwise convolutions run 1.1-1.5× float. Both graphs are profiled at batch 1 on the
target's threads and optimization level (``SessionOptions.enable_profiling``: per-node kernel times), and each
profiled node is traced back to the source node it computes:

- int8: the fused node (QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat, ...) reads the int8 weight
  initializer that the QDQ graph's weight DequantizeLinear reads; that DequantizeLinear's consumer is the node;
- fp32: ONNX Runtime names its NCHWc convolutions after the output they write (``<tensor>_nchwc``) and keeps the
  node's name otherwise; a fused activation's output leads back through the activation to its Conv.

A node is a candidate when ``t_int8 > t_float + t_switch + MIN_NODE_GAIN_MS``, ``t_switch`` being the
DequantizeLinear of its input and the QuantizeLinear of its output that a float node between int8 neighbours adds,
at the per-element cost the int8 profile's own QuantizeLinear shows (a graph input read by the node needs no DequantizeLinear; it saves its
QuantizeLinear instead). The candidates together are one kernel choice (``float_where_faster``), kept only where
the whole graph with them in float is faster than plain int8 (edgequant.check.kernel_choices).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["MIN_NODE_GAIN_MS", "NodeTime", "profile", "slower_in_int8"]

log = logging.getLogger(__name__)

_WEIGHTED = ("Conv", "Gemm", "MatMul")
_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Mul")
_PROFILE_RUNS = 20  # profiled runs at most (after 3 warm-up runs) ...
_PROFILE_SECONDS = 3.0  # ... and no more than this long once 5 have run (a large model)
# a node must save this much per run to be a candidate: below it, per-call overhead and the profiler's 1 µs
# resolution decide (a tiny model's 1×1 convolutions are "slower" in int8 by 3 µs), and the robot gains nothing
MIN_NODE_GAIN_MS = 0.02


@dataclass(frozen=True)
class NodeTime:
    """One source node: its int8 and float kernel times (ms per run) and what running it in float would add."""

    node: str
    int8_ms: float
    float_ms: float
    switch_ms: float

    @property
    def gain_ms(self) -> float:
        return self.int8_ms - self.float_ms - self.switch_ms

    def to_dict(self) -> dict:
        return {"node": self.node, "int8_ms": round(self.int8_ms, 4), "float_ms": round(self.float_ms, 4),
                "switch_ms": round(self.switch_ms, 4)}


def profile(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, threads: int, level: str,
            runs: int = _PROFILE_RUNS) -> tuple[dict[str, float], dict[str, str], onnx.ModelProto]:
    """A model → ({optimized node name: kernel ms per run}, {optimized node name: op type}, the optimized graph)."""
    from ..graph.sessions import session

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        s = session(model, level=level, threads=threads, optimized_path=path,
                    profile_prefix=os.path.join(tmp, "profile"))
        optimized = onnx.load(path, load_external_data=False)
        start = time.perf_counter()
        for i in range(runs + 3):
            s.run(None, dict(inputs))
            if i >= 8 and time.perf_counter() - start > _PROFILE_SECONDS:
                break
        with open(s.end_profiling()) as f:
            events = json.load(f)
    times: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name[: -len("_kernel_time")]
            times[node].append(e["dur"] / 1e3)
            ops[node] = e.get("args", {}).get("op_name", "")
    # the first runs warm caches and pre-pack weights: the later ones, by their median
    return {n: float(np.median(v[3:] if len(v) > 3 else v)) for n, v in times.items()}, ops, optimized


def _int8_sources(qdq: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, str]:
    """{optimized int8 node name: source node name} through the int8 weight each reads."""
    weight_of: dict[str, str] = {}  # int8 weight initializer → the source node its DequantizeLinear feeds
    consumers = defaultdict(list)
    for n in qdq.graph.node:
        for i in n.input:
            consumers[i].append(n)
    inits = {i.name for i in qdq.graph.initializer}
    for n in qdq.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            for c in consumers[n.output[0]]:
                if c.op_type in _WEIGHTED and list(c.input[1:2]) == [n.output[0]]:
                    weight_of[n.input[0]] = c.name
    return {n.name: weight_of[i] for n in optimized.graph.node for i in n.input if i in weight_of}


def _float_sources(fp32: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, str]:
    """{optimized fp32 node name: source Conv/Gemm/MatMul name}: NCHWc nodes are named after the output they write
    (``<tensor>_nchwc``), others keep the source node's name; a fused activation's output leads back to its
    producer."""
    producer = {o: n for n in fp32.graph.node for o in n.output}
    by_name = {n.name: n for n in fp32.graph.node}
    out: dict[str, str] = {}
    for n in optimized.graph.node:
        node = by_name.get(n.name)
        if node is None and n.name.endswith("_nchwc"):
            node = producer.get(n.name[: -len("_nchwc")])
        hops = 0
        while node is not None and node.op_type in _ACTIVATIONS and hops < 3:
            ins = [producer[i] for i in node.input if i in producer and producer[i].op_type in
                   (*_WEIGHTED, *_ACTIVATIONS)]
            node = ins[0] if len(ins) == 1 else None  # a sum of two branches: which one is not known
            hops += 1
        if node is not None and node.op_type in _WEIGHTED:
            out[n.name] = node.name
    return out


def _elements(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Each tensor's element count at these inputs (ONNX shape inference)."""
    from .kernel_cost import static_shapes

    return {k: int(np.prod(v)) for k, v in static_shapes(model, {k: v.shape for k, v in inputs.items()}).items()}


def slower_in_int8(fp32: onnx.ModelProto, qdq: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, threads: int,
                   level: str) -> tuple[list[NodeTime], list[NodeTime]]:
    """The fp32 graph (after the fp32 passes), its plain QDQ int8 graph and a batch-1 input → (the nodes where
    float is faster including the switch, every node both profiles matched), slowest first."""
    t8, ops8, opt8 = profile(qdq, inputs, threads=threads, level=level)
    tf, _, optf = profile(fp32, inputs, threads=threads, level=level)
    src8, srcf = _int8_sources(qdq, opt8), _float_sources(fp32, optf)
    int8_ms: dict[str, float] = defaultdict(float)
    float_ms: dict[str, float] = defaultdict(float)
    for name, ms in t8.items():
        if name in src8:
            int8_ms[src8[name]] += ms
    for name, ms in tf.items():
        if name in srcf:
            float_ms[srcf[name]] += ms
    elements = _elements(fp32, inputs)
    quantize = [(ms, elements.get(n.input[0], 0)) for n in opt8.graph.node for name, ms in t8.items()
                if name == n.name and ops8.get(name) == "QuantizeLinear"]
    per_element = sum(ms for ms, _ in quantize) / max(1, sum(e for _, e in quantize)) if quantize else 0.0
    graph_inputs = {i.name for i in fp32.graph.input}
    nodes = {n.name: n for n in fp32.graph.node}
    matched = []
    for name in int8_ms.keys() & float_ms.keys():
        n = nodes[name]
        x = n.input[0]
        switch = elements.get(n.output[0], 0) * per_element  # its output quantized again
        switch += -elements.get(x, 0) * per_element if x in graph_inputs else elements.get(x, 0) * per_element
        matched.append(NodeTime(name, int8_ms[name], float_ms[name], switch))
    matched.sort(key=lambda t: -t.gain_ms)
    slower = [t for t in matched if t.gain_ms >= MIN_NODE_GAIN_MS]
    log.info("int8 slower than float at %d of %d nodes profiled", len(slower), len(matched))
    return slower, matched
