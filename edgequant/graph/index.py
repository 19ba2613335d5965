"""Def-use indexes of an ONNX graph (protobuf): tensor → the node that writes it, tensor → the nodes that read it.

For edits, use onnx_ir's ``producer()`` / ``uses()``; these are for read-only passes over a ModelProto."""

from __future__ import annotations

import onnx

__all__ = ["consumers", "producers"]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name → the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name → the nodes that read it, in graph order."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users
