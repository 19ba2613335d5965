"""A model without its weights' data, for ONNX shape inference: inferring on the full model would copy every
weight (``onnx.shape_inference.infer_shapes`` serializes its input), so passes that need only shapes and types
run on this copy. Small initializers (at most 64 elements: shape tensors, axes) keep their data, since
inference reads them."""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["weightless_copy"]

_KEEP_DATA = 64  # elements


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model → the same graph (nodes, inputs, outputs, value_info) whose large initializers keep only their
    name, dims and type."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    g = model.graph
    skeleton.graph.name = g.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(skeleton.graph, field).extend(getattr(g, field))
    for init in g.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= _KEEP_DATA:
            skeleton.graph.initializer.append(init)
        else:
            skeleton.graph.initializer.add(name=init.name, dims=init.dims, data_type=init.data_type)
    return skeleton
