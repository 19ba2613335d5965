"""Many trials on one ONNX Runtime session: the QDQ graph with some initializers (activation scales and zero
points, int32 biases) turned into graph inputs, so bias correction and ``method="auto"`` try value after value
without building a session per trial."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .sessions import batches, input_dtypes, session

__all__ = ["as_inputs", "init_arrays", "runner"]


def as_inputs(model: onnx.ModelProto, names: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are graph inputs and with extra graph ``outputs``."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    wanted = set(names)
    keep = [i for i in work.graph.initializer if i.name not in wanted]
    moved = [i for i in work.graph.initializer if i.name in wanted]
    del work.graph.initializer[:]
    work.graph.initializer.extend(keep)
    for t in moved:
        work.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    have = {o.name for o in work.graph.output}
    work.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs if o not in have)
    return work


def runner(model: onnx.ModelProto, samples, batch_size: int):
    """An emulating session (no QDQ fusion, so scales may be inputs) and the sample batches for it."""
    s = session(model, level="disable")
    stacked = list(batches(samples, batch_size, input_dtypes(s)))
    return s, stacked


def init_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
