"""The manifest: what the device needs to run the int8 model (schema in runtimes/README.md). Every job builds it
here, so the device contract is written in one place."""

from __future__ import annotations

from typing import Any

import onnx

from .._runtime.edgequant_runtime import VNNI_FLAGS
from ..targets import Target
from ..version import __version__

__all__ = ["SCHEMA_VERSION", "build_manifest"]

SCHEMA_VERSION = 1


def build_manifest(model: onnx.ModelProto, target: Target, quantization: dict[str, Any], preprocess: Any, *,
                   reference: bool, model_format: str = "onnx-qdq") -> dict[str, Any]:
    """The int8 model, its target, the quantization settings and the image pre-processing (or None) → the
    device contract, without the file checksums the writer adds."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    pre = None
    if preprocess is not None:
        inputs = [i.name for i in graph.input if i.name not in inits]
        pre = {"input": inputs[0], **preprocess.to_dict()}
    tdict = target.to_dict()
    manifest = {
        "schema": "edgequant.bundle",
        "schema_version": SCHEMA_VERSION,
        "producer": f"edgequant {__version__}",
        "model": {"file": "model.onnx", "format": model_format, "opset": _opset(model)},
        "reference_model": {"file": "model.fp32.onnx", "format": "onnx-fp32"} if reference else None,
        "inputs": [_io(v) for v in graph.input if v.name not in inits],
        "outputs": [_io(v) for v in graph.output],
        "preprocess": pre,
        "quantization": quantization,
        "target": {"name": target.name, "description": target.description},
        "runtime": tdict["runtime"],
    }
    quantized_activations = any(n.op_type == "QuantizeLinear" for n in graph.node)
    if quantized_activations and target.needs_vnni_on_x86:
        manifest["requires_cpu"] = {"x86_64_one_of": list(VNNI_FLAGS)}  # the device refuses other x86 CPUs
    return manifest


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _io(value: onnx.ValueInfoProto) -> dict[str, Any]:
    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
