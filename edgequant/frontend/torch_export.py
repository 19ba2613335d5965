"""Model → fp32 ONNX: resolve a model reference, export it with ``torch.onnx.export(dynamo=True)`` and
simplify the graph the way ONNX Runtime's quantizer expects (constant folding, Conv+BatchNorm folding).

A model reference is ``path/to/file.py:factory``, ``package.module:factory``, a ``.onnx`` file, or an
``nn.Module``. The batch axis of every input is exported as dynamic (``batch``) unless the target needs
static shapes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter

from ..errors import ExportError, option
from ..quiet import EXPORTER_LOGGERS, quiet

__all__ = ["constant_initializers", "convert_opset", "export_fp32", "input_names_of", "load_model", "prepare_fp32", "to_onnx"]

log = logging.getLogger(__name__)


def load_model(ref: Any) -> Any:
    """A model reference → an ``nn.Module`` (factory called, eval mode) or an ``onnx.ModelProto``."""
    if isinstance(ref, onnx.ModelProto):
        return ref
    if not isinstance(ref, (str, Path)):
        return _check_module(ref, "the model argument")
    text = str(ref)
    if text.endswith(".onnx"):
        path = Path(text)
        if not path.is_file():
            raise ExportError(f"model file {text} not found")
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises several unrelated types
            if "model" not in locals() or not _runs(model):  # what ONNX Runtime runs is valid enough
                raise ExportError(f"{text}: not a valid ONNX model ({str(exc).splitlines()[0]})") from None
            log.info("%s: ONNX's checker refuses it (%s) but ONNX Runtime loads it", text, _first_line(exc))
        return model
    if ":" not in text:
        raise ExportError(f"model {text!r} is not a reference: use path/to/file.py:factory, package.module:factory "
                          "or a .onnx file")
    target, _, attr = text.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ExportError(f"model file {target} not found (from {text!r})")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        name = f"_edgequant_user_{path.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ExportError(f"{target}: importing it failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ExportError(f"cannot import module {target!r} (from {text!r}): {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ExportError(f"{target} has no attribute {attr!r}; name a function that returns an nn.Module")
    obj = factory
    if callable(factory) and not _is_module(factory):
        try:
            obj = factory()
        except Exception as exc:
            raise ExportError(f"{text}: calling {attr}() failed: {type(exc).__name__}: {exc}") from exc
    return _check_module(obj, f"{text}")


def _runs(model: onnx.ModelProto) -> bool:
    """Whether ONNX Runtime's CPU provider loads ``model``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # onnxruntime raises its own assorted types
        return False


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _check_module(obj: Any, what: str) -> Any:
    if not _is_module(obj):
        raise ExportError(f"{what} gave a {type(obj).__name__}, not a torch.nn.Module; the factory must return "
                          "the model (with its weights loaded)")
    return obj.eval()


def input_names_of(model: Any) -> list[str]:
    """The names of the model's inputs: graph inputs of an ONNX model, forward() arguments of a module."""
    if isinstance(model, onnx.ModelProto):
        inits = {i.name for i in model.graph.initializer}
        return [i.name for i in model.graph.input if i.name not in inits]
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is inspect.Parameter.empty] or [p.name for p in params][:1]


def export_fp32(loaded: Any, samples: Any, *, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    """A loaded model (ONNX passes through) + samples → fp32 ONNX traced on the first sample; an export failure
    names the inputs the data gave (the usual cause is data that does not fit the model)."""
    if isinstance(loaded, onnx.ModelProto):
        return loaded
    example = samples[0]
    try:
        return to_onnx(loaded, example, opset=opset, dynamic_batch=dynamic_batch)
    except ExportError as exc:
        from ..data.samples import image_mismatch

        mismatch = image_mismatch(samples, str(exc))
        if mismatch is not None:
            raise mismatch from None
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in example.items())
        raise ExportError(f"{exc} (inputs from the data, without batch axis: {shapes})") from exc.__cause__


def to_onnx(module: Any, example: dict[str, np.ndarray], *, opset: int, dynamic_batch: bool = True,
            custom_translation_table: dict | None = None) -> onnx.ModelProto:
    """nn.Module + one sample per input (no batch axis) → fp32 ONNX with a dynamic batch axis.
    ``custom_translation_table`` maps custom ops to their ONNX form (as in ``torch.onnx.export``)."""
    import torch

    batch = 2 if dynamic_batch else 1
    kwargs = {k: torch.from_numpy(np.ascontiguousarray(np.stack([v] * batch))) for k, v in example.items()}
    dynamic = {k: {0: torch.export.Dim("batch")} for k in kwargs} if dynamic_batch else None
    stack: list[str] = []
    hooks = _trace_hooks(module, stack)
    try:
        with quiet(*EXPORTER_LOGGERS, level=logging.CRITICAL):
            program = torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, external_data=False,
                                        dynamic_shapes=dynamic, opset_version=max(opset, 18), verbose=False,
                                        optimize=True, custom_translation_table=custom_translation_table)
    except Exception as exc:
        where = f"module '{stack[-1]}" if stack else f"{type(module).__name__}.forward"
        reason = _first_line(exc)
        raise ExportError(f"cannot export {type(module).__name__} to ONNX: {where} failed: {reason}. Make that code "
                          "traceable (no data-dependent Python control flow or unsupported ops), or export it to "
                          ".onnx yourself and pass the file") from exc
    finally:
        for h in hooks:
            h.remove()
    model = program.model_proto
    if dynamic_batch and _batch_specialized(model, kwargs, batch):
        # torch.export kept the traced batch (shape-dependent code, e.g. a detection head's anchor cache): a
        # model fixed at the tracing batch of 2 would refuse the single frames a robot sends, so export at 1
        log.warning("%s's batch axis does not stay dynamic when exported (its code specializes it): exporting "
                    "with a fixed batch of 1", type(module).__name__)
        return to_onnx(module, example, opset=opset, dynamic_batch=False,
                       custom_translation_table=custom_translation_table)
    if model.ByteSize() > 2_000_000_000:
        raise ExportError(f"{type(module).__name__} exports to {model.ByteSize() / 1e9:.1f} GB: ONNX files over 2 GB "
                          "need external data; export it yourself with external_data=True and pass the .onnx folder")
    return model


def _batch_specialized(model: onnx.ModelProto, kwargs: dict, batch: int) -> bool:
    """Whether an exported input's first axis came out as the fixed tracing batch instead of a symbol."""
    for inp in model.graph.input:
        if inp.name in kwargs:
            dims = inp.type.tensor_type.shape.dim
            if dims and not dims[0].dim_param and dims[0].dim_value == batch:
                return True
    return False


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """ONNX model → the same model at ``opset`` (its IR version raised to what that opset needs). The dynamo
    exporter writes opset 18 at the lowest; older opsets are reached with ONNX's converter after constant folding
    (it cannot move ReduceMean's axes otherwise), and old models (opset 7-12) are raised with it."""
    have = _opset(model)
    if have == opset:
        return model
    if opset < 18 <= have:
        model = _drop_default_noop(model)
    try:
        converted = onnx.version_converter.convert_version(model, opset)
        converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(
            [o for o in converted.opset_import if o.domain in ("", "ai.onnx")]))
        if _valid(model):  # a model ONNX's checker refuses (e.g. an input without a shape) but ORT runs stays so
            onnx.checker.check_model(converted)
        return converted
    except Exception as exc:  # the converter raises assorted types
        # a model newer than the target runs at its own opset where QDQ allows it; an older one has no such way
        fix = (f"use {option('opset', have)} (the model's own opset)" if 13 <= have <= 23 else
               f"re-export the model at opset {opset} from its source (or convert it with "
               "onnx.version_converter yourself) and pass that file")
        raise ExportError(f"cannot convert the model from opset {have} to {opset} ({_first_line(exc)}): "
                          f"{fix}") from None


def _valid(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model)
        return True
    except Exception:  # the checker raises several types
        return False


# Reduce ops that took their axes as an input, and gained noop_with_empty_axes, at opset 18 (ReduceSum did at 13)
_REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare"}


def _drop_default_noop(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without ``noop_with_empty_axes=0`` (the default, which ONNX Runtime's optimizer writes out) on
    the Reduce ops that have it only from opset 18: ONNX's converter to opset 17 keeps it and then fails."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type in _REDUCE_18 and node.domain in ("", "ai.onnx"):
            keep = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(keep)
    return out


def constant_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model that lists initializers among its graph inputs (every model before IR version 4 does; later ones
    make them overridable that way) → a copy, at IR version 4 or newer, whose initializers are constants only:
    graph inputs are what the data feeds, and an int8 model's weights cannot be overridden anyway. A model
    without such inputs passes through. Left in, ONNX Runtime neither folds them nor drops their inputs when it
    folds them away, and the opset converter then calls the weights "undefined" (ONNX model zoo, opset 9)."""
    inits = {i.name for i in model.graph.initializer}
    if not inits & {i.name for i in model.graph.input}:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [i for i in out.graph.input if i.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    out.ir_version = max(out.ir_version, 4)
    return out


def _trace_hooks(module: Any, stack: list[str]) -> list:
    names = {m: (n or type(module).__name__) for n, m in module.named_modules()}

    def pre(mod, _args):
        stack.append(f"{names.get(mod, type(mod).__name__)}' ({type(mod).__name__})")

    def post(_mod, _args, _out):
        if stack:
            stack.pop()

    hooks = []
    for mod in module.modules():
        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post))
    return hooks


def _first_line(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None and "torch.onnx" in type(seen).__module__ + str(type(seen)):
        seen = seen.__cause__
    for line in str(seen).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "The above", "[torch.onnx]")):
            return f"{type(seen).__name__}: {clip_line(line)}"
    return type(seen).__name__


def clip_line(line: str, limit: int = 300, hard: int = 1000) -> str:
    """A long message line → at most about ``limit`` characters, cut where no bracket is open (never inside an
    expression such as a guard ``Eq(u0, 1)``) and marked with "…"; if no such place comes before ``limit``,
    at the first one after it (at most ``hard`` characters)."""
    if len(line) <= limit:
        return line
    depth, last = 0, -1
    for i, ch in enumerate(line[:hard]):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and ch in " ,;":
            if i <= limit:
                last = i
            elif last < 0:
                last = i
                break
    if last < 0:
        last = min(len(line), hard)
    return line[:last].rstrip(" ,;:") + " …"


def prepare_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 ONNX → the same model after ONNX Runtime's basic (provider-independent) graph optimizations and
    ONNX shape inference: folded constants and BatchNorm, which is what the quantizer should see."""
    import onnxruntime as ort

    model = constant_initializers(model)
    with tempfile.TemporaryDirectory(prefix="edgequant-") as tmp:
        out = os.path.join(tmp, "basic.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = out
        so.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            why = _first_line(exc)
            fix = ("replace that op with standard ONNX ops" if "not a registered function/op" in why else
                   "fix the model until onnxruntime.InferenceSession loads it")
            raise ExportError(f"ONNX Runtime cannot load the fp32 model: {why}; the model must run on ONNX Runtime's "
                              f"CPU provider: {fix}") from None
        optimized = onnx.load(out)
    del optimized.graph.value_info[:]
    try:
        optimized = onnx.shape_inference.infer_shapes(optimized, strict_mode=False)
    except Exception as exc:  # shape inference is a help, not a requirement
        log.warning("ONNX shape inference failed (%s); continuing without it", _first_line(exc))
    optimized.producer_name = "edgequant"
    name_nodes(optimized.graph)
    strip_debug_metadata(optimized)
    prune_opset_imports(optimized)
    return optimized


# Node metadata the exporter writes: stack traces with absolute source paths, FX node dumps. They make builds
# differ between checkouts and leak the build machine's paths into the device's model; only the module scope
# (deterministic, and what a per-layer report needs to name PyTorch modules) is kept.
_KEEP_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node of ``graph`` a unique name (``<op>_<index>``), in place: the quantizer keeps
    nodes float by name, and the report names layers."""
    used = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def prune_opset_imports(model: onnx.ModelProto) -> None:
    """Keep only the opset domains the graph uses (ONNX Runtime's saved models list every domain it knows)."""
    used = {"", *(n.domain for n in model.graph.node)}
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop per-node exporter metadata except the module scope, in place (the model is ours, not the caller's)."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key in _KEEP_NODE_METADATA]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            if hasattr(value, "metadata_props"):
                del value.metadata_props[:]
