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

__all__ = ["batch_axes", "check_data_fits", "fix_input_shapes", "parse_input_shape", "resolve_input_shapes",
           "unbatched"]


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


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """A graph input's dimensions (a size, a symbol or None where unknown); None when its rank is unknown."""
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


_BATCH_WORDS = ("batch", "n", "b", "bs", "nb")


def _batch_symbol(model: onnx.ModelProto) -> str | None:
    """The symbolic dimension that names the batch: one called like a batch ("batch", "batch_size", "N", ...),
    else the one most graph inputs share (and the outputs carry), else None."""
    counts: dict[str, int] = {}
    for value in (*_inputs(model), *model.graph.output):
        for d in set(_dims(value) or []):
            if isinstance(d, str):
                counts[d] = counts.get(d, 0) + 1
    named = [d for d in counts if d.lower() in _BATCH_WORDS or "batch" in d.lower()]
    if named:
        return max(named, key=lambda d: counts[d])
    shared = [d for d, n in counts.items() if n > 1]
    return max(shared, key=lambda d: counts[d]) if len(shared) == 1 else None


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _fits(dims: Sequence[int | str | None], shape: Sequence[int]) -> bool:
    return len(dims) == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(dims, shape))


def batch_axes(model: onnx.ModelProto, example: Mapping[str, np.ndarray]) -> dict[str, int | None]:
    """Graph inputs + one sample per input → {input: the axis its batches stack along, or None}.

    A sample with the rank of its graph input holds the whole input (recurrent state, a scalar sample rate):
    None, fed as given. A sample one rank short lacks the batch axis: the axis with the graph's batch symbol
    (its dim_param, e.g. ``N`` of ``[T, N, C]``); without one, of the axes whose removal leaves a shape that
    fits the sample, the first free one (symbolic or unknown), else the first fixed at 1, else the first. An
    input of unknown rank batches along axis 0."""
    symbol = _batch_symbol(model)
    out: dict[str, int | None] = {}
    for inp in _inputs(model):
        if inp.name not in example:
            continue
        dims, shape = _dims(inp), np.shape(example[inp.name])
        if dims is None or len(dims) != len(shape) + 1:
            out[inp.name] = None if dims is not None and len(dims) == len(shape) else 0
            continue
        if symbol is not None and symbol in dims:  # the graph says where the batch is
            out[inp.name] = dims.index(symbol)
            continue
        fits = [k for k in range(len(dims)) if _fits(dims[:k] + dims[k + 1:], shape)] or [0]
        out[inp.name] = min(fits, key=lambda k: (isinstance(dims[k], int) and dims[k] != 1, isinstance(dims[k], int),
                                                 k))
    return out


def unbatched(dims: Sequence, axis: int | None) -> list:
    """A graph input's dimensions → those a sample has (the batch axis taken out; all where there is none)."""
    return list(dims) if axis is None else [*dims[:axis], *dims[axis + 1:]]


def resolve_input_shapes(model: onnx.ModelProto, example: Mapping[str, np.ndarray],
                         given: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Graph inputs + one sample + the user's shapes → {input: fixed shape}; an input the user did not name
    gets the sample's shape with a batch of 1 (or the one the model fixes) on its batch axis (see
    :func:`batch_axes`). ``given`` may use the key "" for a single-input model."""
    inputs = _inputs(model)
    axes = batch_axes(model, example)
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
            shape = tuple(np.shape(example[inp.name]))
            axis = axes.get(inp.name)
            if axis is not None:
                fixed = dims[axis] if dims is not None else None
                batch = fixed if isinstance(fixed, int) else 1  # a batch the model fixes, else 1
                shape = (*shape[:axis], batch, *shape[axis:])
        else:
            raise DataError(f"input {inp.name!r} has no sample to take a fixed shape from: pass it in "
                            f"{option('input_shapes')}")
        if dims is None and inp.name in example and len(shape) != np.ndim(example[inp.name]) + 1:
            raise DataError(f"input {inp.name!r} (rank unknown to the model): fixed shape {list(shape)} does not fit "
                            f"its samples of shape {list(np.shape(example[inp.name]))}: give "
                            f"{np.ndim(example[inp.name]) + 1} dimensions, the batch first")
        if dims is None:
            dims = [None] * len(shape)  # unknown rank: the user's shape is the rank
        if not _fits(dims, shape):
            want = ["?" if not isinstance(d, int) else d for d in dims]
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
        value = next((i for i in out.graph.input if i.name == name), None)
        if value is not None and _dims(value) is None:  # unknown rank: the shape is written as it is
            value.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=int(d)) for d in shape)
            continue
        make_input_shape_fixed(out.graph, name, [int(d) for d in shape])
    fix_output_shapes(out)
    return out


def check_data_fits(model: onnx.ModelProto, samples) -> None:
    """Each sample's shape must match the graph input (its batch axis excluded: ``Sample.batch_axes``, else
    axis 0); a DataError names the sample."""
    example = samples[0]
    axes = getattr(example, "batch_axes", {})
    for inp in _inputs(model):
        if inp.name not in example or _dims(inp) is None:
            continue
        dims = [d if isinstance(d, int) else None for d in unbatched(_dims(inp), axes.get(inp.name, 0))]
        shape = list(np.shape(example[inp.name]))
        if not _fits(dims, shape):
            want = ["?" if d is None else d for d in dims]
            pre = samples.preprocess
            if pre is not None and len(dims) == 3 and len(shape) == 3:
                from ..data.samples import channel_fix

                axis = 0 if pre.layout == "nchw" else 2
                fix = channel_fix(pre, shape[axis], dims[axis]) if dims[axis] is not None else None
                if fix is not None:
                    raise DataError(f"{samples.source}: the images become inputs of shape {shape} "
                                    f"({pre.channel_order}, {pre.layout}), but the model expects {want}: pass {fix}")
            forms = (f"{want} (without batch axis) or {_full(inp)} (the whole input, fed as given)" if _full(inp)
                     else "a scalar (shape [])")
            raise DataError(f"{samples.label(0)}: input {inp.name!r} has shape {shape} but the model expects {forms}; "
                            "fix the data or its pre-processing")


def _full(inp: onnx.ValueInfoProto) -> list:
    return ["?" if not isinstance(d, int) else d for d in _dims(inp)]
