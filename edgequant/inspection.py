"""Where a bundle's nodes run, and in which precision: bundle (+ target) → :class:`Inspection`, one row per
compute node (Q/DQ excluded) with its provider, int8 or float, the reason, and its multiply-accumulates (MACs).

For a provider whose profile says ``kernels = "ort-cpu"`` (the CPU provider), int8 placement is read from
ONNX Runtime's own optimized graph at the profile's optimization level: a node is int8 when ORT fused its
DQ→op→Q group into an int8 kernel (QLinearConv, QGemm, ...) or runs it directly on 8-bit data (Reshape,
MaxPool, ...). For the other providers (TensorRT, NNAPI, XNNPACK), which cannot be loaded here, it follows
the profile's declared capabilities: the QDQ op types the provider runs in int8, the activation/weight dtypes
it takes, whether it needs zero points of 0, and which ops may carry per-channel weights. The provider chain
is walked in order; a node the first provider refuses goes to the next, as ONNX Runtime's partitioner does.
ONNX Runtime has no API that answers this for providers absent from the machine, hence this module.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .bundle.core import Bundle, load_bundle
from .errors import BundleError, TargetError, option
from .targets import ProviderSpec, Target, load_target
from .check.fidelity import INT8_OPS
from .graph.sessions import session

__all__ = ["Inspection", "NodePlacement", "inspect_bundle"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_LEVELS = ("disable", "basic", "extended", "all")
# ORT int8 kernels whose output is float (no output QuantizeLinear was fused).
_FLOAT_OUT = {"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"}


@dataclass(frozen=True)
class NodePlacement:
    """One compute node of the int8 model: where it runs and why."""

    node: str
    op_type: str
    precision: str  # "int8", "4-bit weights" (MatMulNBits), "float", or "fused" (no kernel of its own after
    #                 ONNX Runtime's optimizer)
    provider: str  # "" when no provider of the chain is known to take it
    macs: int
    reason: str


@dataclass(frozen=True)
class Inspection:
    """A bundle's nodes as its target runs them."""

    target: str
    providers: tuple[str, ...]
    nodes: tuple[NodePlacement, ...]

    @property
    def total_macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    @property
    def int8_macs(self) -> int:
        return sum(n.macs for n in self.nodes if n.precision == "int8")

    @property
    def int8_mac_share(self) -> float:
        """int8 MACs / all MACs (1.0 for a model without MACs)."""
        return self.int8_macs / self.total_macs if self.total_macs else 1.0

    @property
    def quantized_macs(self) -> int:
        """MACs of nodes that run with 8 bits or fewer (int8 kernels, or MatMulNBits' 4/8-bit weights)."""
        return sum(n.macs for n in self.nodes if n.precision not in ("float", "fused"))

    def to_dict(self) -> dict:
        return {"target": self.target, "providers": list(self.providers), "total_macs": self.total_macs,
                "int8_macs": self.int8_macs, "int8_mac_share": round(self.int8_mac_share, 6),
                "quantized_macs": self.quantized_macs,
                "nodes": [asdict(n) for n in self.nodes]}

    def lines(self) -> list[str]:
        """A terminal table: one line per node, then the MAC share."""
        width = max([9, *(len(n.precision) for n in self.nodes)])
        out = [f"target {self.target}: {' > '.join(self.providers)}",
               f"{'node':<28} {'op':<18} {'precision':<{width}} {'provider':<26} {'MACs':>10}  why"]
        for n in self.nodes:
            out.append(f"{n.node[:28]:<28} {n.op_type[:18]:<18} {n.precision:<{width}} {n.provider[:26] or '-':<26} "
                       f"{n.macs:>10}  {n.reason}")
        out.append(self.summary())
        return out

    def summary(self) -> str:
        """One line: how many nodes and MACs run quantized, in the words of their precision (int8, 4-bit weights)."""
        counts: dict[str, int] = {}
        for n in self.nodes:
            if n.precision not in ("float", "fused"):
                counts[n.precision] = counts.get(n.precision, 0) + 1
        what = "int8" if set(counts) <= {"int8"} else ", ".join(
            f"{c} {'with ' if p.endswith('weights') else 'in '}{p}" for p, c in sorted(counts.items()))
        nodes = (f"{sum(counts.values())} of {len(self.nodes)} nodes in int8" if what == "int8"
                 else f"{sum(counts.values())} of {len(self.nodes)} nodes quantized ({what})")
        if not self.total_macs:
            return f"{nodes}; no multiply-accumulates counted (no Conv/MatMul/Gemm with known shapes)"
        share = 100 * self.quantized_macs / self.total_macs
        label = "MACs in int8" if what == "int8" else "MACs quantized"
        return f"{nodes}; {label}: {self.quantized_macs:,} of {self.total_macs:,} ({share:.1f}%)"


def inspect_bundle(bundle: str | Path | Bundle, *, target: str | Path | Target | None = None) -> Inspection:
    """Bundle (and optionally another target than its own) → where each compute node runs, in which precision."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    model = onnx.load(str(b.model_path))
    if target is not None:
        tgt = load_target(target)
        name, providers, level = tgt.name, tgt.runtime.providers, tgt.runtime.graph_optimization_level
    else:
        runtime = b.manifest["runtime"]
        name, level = b.manifest["target"]["name"], runtime["graph_optimization_level"]
        if all("kernels" in p for p in runtime["providers"]):
            providers = tuple(_provider(p) for p in runtime["providers"])
        else:  # written before profiles declared capabilities: take them from the profile of that name
            try:
                providers = load_target(name).runtime.providers
            except TargetError:
                raise BundleError(f"{b.path}: the manifest does not say what its providers run in int8 and "
                                  f"{name!r} is not a built-in target; pass {option('target')} with its "
                                  "profile") from None
    cpu = _cpu_placement(model, level) if any(p.kernels == "ort-cpu" for p in providers) else {}
    macs = _macs(model)
    graph = _Graph(model)
    rows = []
    for node in model.graph.node:
        if node.op_type in _QDQ:
            continue
        precision, provider, reason = _place(node, graph, providers, cpu)
        if node.op_type == "MatMulNBits" and precision == "int8":
            attrs = {a.name: a.i for a in node.attribute}
            precision = f"{attrs.get('bits', 4)}-bit weights"
            reason = (f"ONNX Runtime runs MatMulNBits: {attrs.get('bits', 4)}-bit weights in blocks of "
                      f"{attrs.get('block_size', '?')}, float activations")
        rows.append(NodePlacement(node.name, node.op_type, precision, provider, macs.get(node.name, 0), reason))
    return Inspection(name, tuple(p.name for p in providers), tuple(rows))


def _provider(d: dict) -> ProviderSpec:
    fields = set(ProviderSpec.__dataclass_fields__)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
    kwargs["options"] = tuple(sorted((d.get("options") or {}).items()))
    return ProviderSpec(**kwargs)


class _Graph:
    """Lookups on the QDQ model: the producer of each tensor, constant values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.inits = {i.name: i for i in model.graph.initializer}

    def dq_of(self, tensor: str) -> onnx.NodeProto | None:
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def array(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    def zero_point(self, qdq: onnx.NodeProto) -> np.ndarray | None:
        return self.array(qdq.input[2]) if len(qdq.input) > 2 and qdq.input[2] else None


def _dtype(zp: np.ndarray | None) -> str:
    return "uint8" if zp is None else str(zp.dtype)  # a Q/DQ without zero point is uint8 by the ONNX spec


def _place(node, graph: _Graph, providers, cpu: dict[str, tuple[bool, str]]) -> tuple[str, str, str]:
    """Walk the chain: the first provider that runs the node in int8 takes it; otherwise it stays float."""
    act = graph.dq_of(node.input[0]) if node.input else None
    weight = graph.dq_of(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    refusals = []
    for p in providers:
        if p.kernels == "ort-cpu":
            if node.name not in cpu:
                return "fused", p.name, "; ".join([*refusals, "removed by ONNX Runtime's optimizer (folded into a "
                                                               "neighbouring node)"])
            int8, why = cpu[node.name]  # ORT also quantizes some float neighbours of QDQ groups itself
            if int8:
                return "int8", p.name, "; ".join([*refusals, why])
            refusals.append(f"{p.name}: {why}")
        elif act is None:
            refusals.append(f"{p.name}: not quantized (no Q/DQ around it: op type not in the profile's op_types, "
                            "excluded, or a float-only tensor)")
        else:
            why = _refusal(node, act, weight, graph, p)
            if why is None:
                return "int8", p.name, "; ".join([*refusals, f"runs QDQ {node.op_type} in int8 (profile declares it)"])
            refusals.append(f"{p.name}: {why}")
    return "float", _float_provider(providers), "; ".join(refusals)


def _float_provider(providers) -> str:
    return providers[-1].name if providers[-1].kernels == "ort-cpu" else ""


def _refusal(node, act, weight, graph: _Graph, p: ProviderSpec) -> str | None:
    """Why declared provider ``p`` would not run this QDQ group in int8, or None if it would."""
    if node.op_type not in p.int8_op_types:
        return f"no int8 {node.op_type} kernel"
    a_zp = graph.zero_point(act)
    a_type = _dtype(a_zp)
    if weight is not None:
        w_zp = graph.zero_point(weight)
        pair = f"{a_type}/{_dtype(w_zp)}"
        if pair not in p.dtypes:
            return f"refuses {pair} (activation/weight); takes {', '.join(p.dtypes)}"
        if p.symmetric_weights and w_zp is not None and np.any(w_zp != 0):
            return "needs weight zero points of 0"
        scale = graph.array(weight.input[1])
        if scale is not None and scale.size > 1 and node.op_type not in p.per_channel_op_types:
            return f"no per-channel weights for {node.op_type}"
    elif a_type not in {d.split("/")[0] for d in p.dtypes}:
        return f"refuses {a_type} activations"
    if p.symmetric_activations and a_zp is not None and np.any(a_zp != 0):
        return "needs activation zero points of 0"
    return None


def _cpu_placement(model: onnx.ModelProto, level: str) -> dict[str, tuple[bool, str]]:
    """QDQ model → {node name: (runs in int8, why)} from ONNX Runtime's CPU graph at ``level`` (capped at
    extended: the layout transforms of "all" only rename kernels)."""
    capped = _LEVELS[min(_LEVELS.index(level), _LEVELS.index("extended"))]
    with tempfile.TemporaryDirectory(prefix="edgequant-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model, level=capped, optimized_path=path)
        optimized = onnx.load(path)
    inits = {i.name for i in optimized.graph.initializer}
    producer = {o: n.op_type for n in optimized.graph.node for o in n.output}
    int8_tensors: set[str] = set()
    out = {}
    for n in optimized.graph.node:
        data_in = [i for i in n.input if i and i not in inits]
        if n.op_type in _QDQ:
            if n.op_type == "QuantizeLinear":
                int8_tensors.update(n.output)
            continue
        if n.op_type in INT8_OPS:
            out[n.name] = (True, f"ONNX Runtime fused it into {n.op_type}")
            if n.op_type not in _FLOAT_OUT:
                int8_tensors.update(n.output)
        elif data_in and all(i in int8_tensors for i in data_in):
            out[n.name] = (True, f"ONNX Runtime runs {n.op_type} directly on 8-bit data")
            int8_tensors.update(n.output)
        elif any(producer.get(i) == "DequantizeLinear" for i in data_in):
            fused = "" if capped == "extended" else f" (optimization level {level}: no QDQ fusion)"
            out[n.name] = (False, f"ONNX Runtime runs DQ -> float {n.op_type} -> Q{fused}")
        else:
            out[n.name] = (False, "not quantized (no Q/DQ around it: op type not in the profile's op_types, "
                                  "excluded, or a float-only tensor)")
    return out


def _macs(model: onnx.ModelProto) -> dict[str, int]:
    """Node name → multiply-accumulates for one sample (symbolic dimensions taken as 1), for Conv, ConvTranspose,
    MatMul and Gemm: MACs = output elements × reduction length."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for i, n in enumerate(work.graph.node):  # MatMulNBits → MatMul on a data-less [K, N] input: shapes propagate
        if n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            w = f"{n.name}__weight_shape"
            work.graph.input.append(onnx.helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT,
                                                                       [attrs["K"], attrs["N"]]))
            work.graph.node[i].CopyFrom(onnx.helper.make_node("MatMul", [n.input[0], w], list(n.output)[:1],
                                                              name=n.name))
    for v in work.graph.input:
        for d in v.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    try:
        work = onnx.shape_inference.infer_shapes(work)
    except Exception:  # noqa: BLE001 - shape inference is best effort; MACs then stay 0
        return {}
    shapes = {}
    for v in [*work.graph.input, *work.graph.value_info, *work.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
        shapes[v.name] = dims
    for i in work.graph.initializer:
        shapes[i.name] = list(i.dims)
    out = {}
    for n in work.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        a, w, y = shapes.get(n.input[0]), shapes.get(n.input[1]), shapes.get(n.output[0])
        if not a or not w or not y or 0 in a + w + y:
            continue
        if n.op_type == "Conv":
            out[n.name] = int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            out[n.name] = int(np.prod(a)) * int(np.prod(w[1:]))
        elif n.op_type == "MatMul":
            out[n.name] = int(np.prod(y)) * a[-1]
        else:
            trans_a = next((att.i for att in n.attribute if att.name == "transA"), 0)
            out[n.name] = int(np.prod(y)) * (a[0] if trans_a else a[-1])
    return out
