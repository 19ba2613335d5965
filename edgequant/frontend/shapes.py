"""Fixed input shapes for targets that need them (NNAPI, TensorRT engines, ...): model + shapes → a copy of
the model whose graph inputs (and, where inference allows, outputs) have concrete dimensions.

The edit itself is ONNX Runtime's own helper (``onnxruntime.tools.onnx_model_utils.make_input_shape_fixed``,
the code behind ``python -m onnxruntime.tools.make_dynamic_shape_fixed``), which also replaces a symbolic
dimension everywhere it is used. What is ours: choosing the shapes (the user's, else batch 1 and the
calibration data's shape) and checking them against the model with a message that names the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from ..errors import DataError, option

__all__ = ["check_data_fits", "fix_input_shapes", "parse_input_shape", "resolve_input_shapes"]


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x:1,3,224,224"`` or ``"1x3x224x224"`` (the only input) → (name or "", shape)."""
    name, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise DataError(f"--input-shape {text!r}: write NAME:D0,D1,... or D0xD1x... with whole numbers") from None
    if not shape or min(shape) < 1:
        raise DataError(f"--input-shape {text!r}: every dimension must be a positive whole number")
    return name.strip(), shape


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def resolve_input_shapes(model: onnx.ModelProto, example: Mapping[str, np.ndarray],
                         given: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Graph inputs + one sample (no batch axis) + the user's shapes → {input: fixed shape}; an input the user
    did not name gets batch 1 (or the batch the model fixes) and the sample's shape. ``given`` may use the key "" for a single-input model."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    given = dict(given or {})
    if "" in given:
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise DataError(f"--input-shape without a name needs a single-input model; this one has {names}: "
                            "write NAME:D0,D1,...")
        given[inputs[0].name] = given.pop("")
    unknown = sorted(set(given) - {i.name for i in inputs})
    if unknown:
        raise DataError(f"{option('input_shapes')} names {', '.join(unknown)}, which the model does not have; its "
                        "inputs are "
                        f"{', '.join(i.name for i in inputs)}")
    out = {}
    for inp in inputs:
        dims = _dims(inp)
        if inp.name in given:
            shape = tuple(int(d) for d in given[inp.name])
        elif inp.name in example:
            batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else 1  # a batch the model fixes
            shape = (batch, *np.shape(example[inp.name]))
        else:
            raise DataError(f"input {inp.name!r} has no sample to take a fixed shape from: pass it in "
                            f"{option('input_shapes')}")
        bad = len(shape) != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, shape))
        if bad:
            want = ["?" if not isinstance(d, int) or d <= 0 else d for d in dims]
            raise DataError(f"input {inp.name!r}: fixed shape {list(shape)} does not fit the model's {want}; "
                            "only the ? dimensions can be chosen")
        out[inp.name] = shape
    return out


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Model + {input: shape} → a new model with those input shapes fixed (``model`` is not changed)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name, shape in shapes.items():
        make_input_shape_fixed(out.graph, name, [int(d) for d in shape])
    fix_output_shapes(out)
    return out


def check_data_fits(model: onnx.ModelProto, samples) -> None:
    """Each sample's shape must match the graph input (batch axis excluded); a DataError names the sample."""
    example = samples[0]
    for inp in model.graph.input:
        if inp.name not in example:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim][1:]
        shape = list(example[inp.name].shape)
        if len(dims) != len(shape) or any(d is not None and d != s for d, s in zip(dims, shape)):
            want = ["?" if d is None else d for d in dims]
            pre = samples.preprocess
            if pre is not None and len(dims) == 3 and len(shape) == 3:
                from ..data.samples import channel_fix

                axis = 0 if pre.layout == "nchw" else 2
                fix = channel_fix(pre, shape[axis], dims[axis]) if dims[axis] is not None else None
                if fix is not None:
                    raise DataError(f"{samples.source}: the images become inputs of shape {shape} "
                                    f"({pre.channel_order}, {pre.layout}), but the model expects {want}: pass {fix}")
            raise DataError(f"{samples.label(0)}: input {inp.name!r} has shape {shape} but the model expects "
                            f"{want} (without batch axis); fix the data or its pre-processing")
