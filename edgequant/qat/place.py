"""Where fake quantization goes: the PyTorch mirror of ONNX Runtime's QDQ placement, read from a target profile.

``prepare`` traces the model with ``torch.fx`` and gives each graph node the ONNX op type the exporter writes
for it (Conv, Gemm, Relu, Clip, Add, GlobalAveragePool, Flatten, ...). Walking the nodes in order, the rules of
ONNX Runtime's ``QDQQuantizer`` (its operator registry) decide which tensors are quantized, so that the QAT
graph and the PTQ graph of the same model and target quantize the same tensors:

- an op in the profile's ``op_types`` quantizes its float inputs and its output (Conv, Gemm, Add, Concat, ...);
- Relu/Clip right after a quantized single-use tensor is absorbed: one quantizer on its output (asymmetric
  activations only, as in ``QDQRemovableActivation``), which ONNX Runtime then fuses into the producer;
- shape-only and order-preserving ops (Reshape, Flatten, Transpose, MaxPool, AveragePool, ...) reuse their
  input's quantization (``QDQDirect8BitOp``), so they need no quantizer of their own.
Weights are quantized inside :class:`~edgequant.qat.modules.QuantConv` / ``QuantLinear``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

__all__ = ["DIRECT_OPS", "REMOVABLE_OPS", "onnx_op", "place"]

DIRECT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "AveragePool",
                        "Slice", "Resize", "Split"})
REMOVABLE_OPS = frozenset({"Relu", "Clip"})
_PASS = "pass"  # no op in ONNX (Identity, Dropout in eval mode)

_MODULES: list[tuple[type, str]] = [
    (nn.modules.conv._ConvNd, "Conv"), (nn.Linear, "Gemm"), (nn.ReLU, "Relu"), (nn.ReLU6, "Clip"),
    (nn.Hardtanh, "Clip"), (nn.modules.pooling._MaxPoolNd, "MaxPool"), (nn.modules.pooling._AvgPoolNd, "AveragePool"),
    (nn.Flatten, "Flatten"), (nn.Sigmoid, "Sigmoid"), (nn.LeakyReLU, "LeakyRelu"), (nn.Identity, _PASS),
    (nn.Dropout, _PASS),
]
_FUNCTIONS: dict[Any, str] = {
    operator.add: "Add", torch.add: "Add", operator.mul: "Mul", torch.mul: "Mul", torch.cat: "Concat",
    torch.concat: "Concat", torch.relu: "Relu", F.relu: "Relu", F.relu6: "Clip", F.hardtanh: "Clip",
    torch.clamp: "Clip", torch.flatten: "Flatten", torch.reshape: "Reshape", torch.sigmoid: "Sigmoid",
    F.max_pool2d: "MaxPool", F.avg_pool2d: "AveragePool", torch.transpose: "Transpose", torch.permute: "Transpose",
    torch.squeeze: "Squeeze", torch.unsqueeze: "Unsqueeze", F.leaky_relu: "LeakyRelu", F.dropout: _PASS,
}
_METHODS = {"add": "Add", "mul": "Mul", "relu": "Relu", "flatten": "Flatten", "view": "Reshape",
            "reshape": "Reshape", "permute": "Transpose", "transpose": "Transpose", "squeeze": "Squeeze",
            "unsqueeze": "Unsqueeze", "sigmoid": "Sigmoid", "clamp": "Clip"}


def _is_float_tensor(node: Any) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _global_pool(node: fx.Node, module: nn.Module | None) -> bool:
    out = node.meta.get("tensor_meta")
    return out is not None and len(out.shape) >= 3 and all(d == 1 for d in out.shape[2:])


def onnx_op(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The ONNX op type the exporter writes for ``node`` (None: not one the placement knows)."""
    if node.op == "call_module":
        module = modules[node.target]
        from .modules import QuantConv, QuantLinear

        if isinstance(module, QuantConv):
            return "Conv"
        if isinstance(module, QuantLinear):
            return "Gemm"
        if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
            return "GlobalAveragePool" if _global_pool(node, module) else None
        return next((op for kind, op in _MODULES if isinstance(module, kind)), None)
    if node.op == "call_function":
        if node.target is F.adaptive_avg_pool2d:
            return "GlobalAveragePool" if _global_pool(node, None) else None
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        if node.target == "mean":
            return "GlobalAveragePool" if _global_pool(node, None) else None
        return _METHODS.get(node.target)
    return None


def _clip_max(node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
    """Upper bound of a Clip that starts at 0 (ReLU6, hardtanh(0, m)), else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Hardtanh) and m.min_val == 0:
            return float(m.max_val)
    elif node.target is F.relu6:
        return 6.0
    return None


def place(graph: fx.Graph, modules: dict[str, nn.Module], op_types: set[str],
          symmetric_activations: bool) -> tuple[list[fx.Node], dict[fx.Node, float], list[str]]:
    """The nodes whose output gets an activation quantizer (in graph order), a scale cap for those that follow
    a clip starting at 0, and the ONNX op types that will run quantized."""
    outputs = _graph_outputs(graph)
    alias: dict[fx.Node, fx.Node] = {}
    state: dict[fx.Node, str] = {}  # tensor → "own" (has its quantizer) or "shared" (reuses its input's)
    caps: dict[fx.Node, float] = {}
    quantized_ops: list[str] = []

    def root(n: Any) -> Any:
        while n in alias:
            n = alias[n]
        return n

    for node in graph.nodes:
        op = onnx_op(node, modules)
        if op is None:
            continue
        args = [root(a) for a in node.all_input_nodes if _is_float_tensor(a)]
        if op == _PASS:
            if args:
                alias[node] = args[0]
            continue
        if op not in op_types or not args:
            continue
        if op in REMOVABLE_OPS:
            src = args[0]
            if src not in state:
                continue
            if (not symmetric_activations and state[src] == "own" and len(src.users) == 1
                    and src.op != "placeholder" and src not in outputs):
                del state[src]
            state[node] = "own"
            cap = _clip_max(node, modules)
            if cap is not None:
                caps[node] = cap
        elif op in DIRECT_OPS:
            if args[0] in state:
                state[node] = "shared"
        else:
            for a in args:
                state.setdefault(a, "own")
            state[node] = "own"
            quantized_ops.append(op)
    order = {n: i for i, n in enumerate(graph.nodes)}
    own = sorted((n for n, s in state.items() if s == "own"), key=order.__getitem__)
    return own, {n: c for n, c in caps.items() if n in state}, quantized_ops


def _graph_outputs(graph: fx.Graph) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "output":
            fx.node.map_arg(n.args, lambda a: found.add(a))
    return found
