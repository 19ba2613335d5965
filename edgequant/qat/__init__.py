"""Quantization-aware training: ``prepare`` a model → train it in any loop → ``export`` the same bundle as PTQ.

    qmodel = edgequant.qat.prepare(model, example_inputs, target="generic-cpu")   # a new module
    ... train qmodel (plain loop, Lightning Fabric, torch DDP); optionally qat.freeze_observers(qmodel) ...
    bundle = edgequant.qat.export(qmodel, out="build/qat", calibration=val_samples)

Why this mechanism. The exported int8 graph must compute what the QAT model computed, so the export writes the
model's own fake quantizers as QuantizeLinear/DequantizeLinear pairs (``torch.onnx.export(dynamo=True)`` with a
custom op, see ``qat_modules``) instead of re-deriving scales with a second quantizer: the learned scales, zero
points and integer grids are carried over bit for bit. Two small ONNX clean-ups then give ONNX Runtime the
groups it fuses into int8 kernels: weights stored as int8 initializers, and biases as int32 with scale
s_x · s_w (the form ONNX Runtime's own quantizer writes for PTQ). Placement comes from ``qat_place``, a mirror of ONNX
Runtime's QDQ rules driven by the target profile, so the QAT and PTQ graphs quantize the same ops. PT2E
(``prepare_qat_pt2e``, in torchao) was not used: torch 2.13 lacks it, and torchao ships no quantizer for ONNX
Runtime targets, so its placement would have been ours to write anyway.

Biases train in float and are used rounded to the int32 grid s_x · s_w, as the device adds them. What remains
between PyTorch and ONNX Runtime is float rounding (ORT requantizes with one float multiplier), which flips an
occasional value by one step; ``report["qat"]["agreement"]`` measures it on the given samples.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.core import Bundle
from ..config import ExportConfig
from ..data.samples import ImagePreprocess, load_samples
from ..errors import ExportError, QuantizationError, UnsupportedOnTarget
from ..targets import Target, load_target

__all__ = ["QATConfig", "export", "export_checkpoint", "freeze_observers", "load_checkpoint", "prepare",
           "save_checkpoint", "unwrap"]

log = logging.getLogger(__name__)

_BN_MODES = ("fold", "freeze")


@dataclass(frozen=True)
class QATConfig:
    """QAT settings. ``bn``: "fold" BatchNorm into the convolution before training, or "freeze" it (running
    statistics fixed, folded on the fly). ``weight_bits``: None for the target's (8, or 7 with reduce_range), or
    2-8 for a narrower grid stored in int8. ``learn_scales``: LSQ-style activation scales, trained after
    :func:`freeze_observers`. ``momentum``: how far each training batch moves an observed range."""

    target: str = "generic-cpu"
    bn: str = "fold"
    weight_bits: int | None = None
    learn_scales: bool = False
    momentum: float = 0.01

    def __post_init__(self) -> None:
        if self.bn not in _BN_MODES:
            raise QuantizationError(f"bn={self.bn!r} is not a BatchNorm mode: use one of {', '.join(_BN_MODES)}")
        if self.weight_bits is not None and not (isinstance(self.weight_bits, int) and 2 <= self.weight_bits <= 8):
            raise QuantizationError(f"weight_bits={self.weight_bits!r}: use an integer from 2 to 8, or None")
        if not 0.0 < self.momentum <= 1.0:
            raise QuantizationError(f"momentum={self.momentum!r}: use a value in (0, 1]")


@dataclass(frozen=True)
class _State:
    config: QATConfig
    target: Target
    quantized_ops: tuple[str, ...]


def _weight_range(config: QATConfig, target: Target) -> tuple[int, int]:
    """The integer grid of the weights, as the target's quantizer uses it (symmetric, zero point 0)."""
    q = target.quantization
    if q.weight_dtype != "int8" or not q.weight_symmetric:
        raise UnsupportedOnTarget(f"target {target.name}: QAT needs symmetric int8 weights (weight_dtype = \"int8\", "
                                  "weight_symmetric = true in the profile)")
    bits = config.weight_bits
    # learned weights have no calibrated pair limits: saturating-pair targets (AVX2) get 7 bits, as reduce_range
    narrow = q.reduce_range or q.pair_saturation
    if bits is None:
        return (-64, 64) if narrow else (-127, 127)
    if narrow and bits > 7:
        raise UnsupportedOnTarget(f"target {target.name} limits weights to 7 bits (reduce_range): use weight_bits=7 "
                                  "or fewer, or a target without reduce_range such as x86-vnni or arm64")
    m = 2 ** (bits - 1) - 1
    return -m, m


def _activation_range(target: Target) -> tuple[int, int]:
    q = target.quantization
    if q.activation_dtype == "uint8":
        return 0, 255
    return (-127, 127) if q.activation_symmetric else (-128, 127)


def prepare(model: Any, example_inputs: Any, *, target: str | Path | Target = "generic-cpu", bn: str = "fold",
            weight_bits: int | None = None, learn_scales: bool = False, momentum: float = 0.01,
            calibration: Any = None, batch_size: int = 32) -> Any:
    """An ``nn.Module`` and example inputs (a tensor or a tuple, with batch axis) → a new module with fake
    quantization where the target's int8 graph quantizes; ``model`` is not changed. Activation ranges start
    from ``calibration`` (samples, as for ``edgequant.frontend.torch_export``) or, without it, from ``example_inputs``."""
    import torch

    from .modules import ActQuant
    from .place import place

    tgt = load_target(target)
    config = QATConfig(target=tgt.name if isinstance(target, Target) else str(target), bn=bn,
                       weight_bits=weight_bits, learn_scales=learn_scales, momentum=momentum)
    w_range = _weight_range(config, tgt)
    examples = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    examples = tuple(torch.from_numpy(np.ascontiguousarray(e)) if isinstance(e, np.ndarray) else e for e in examples)
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"qat.prepare needs a torch.nn.Module, not a {type(model).__name__}")
    was_training = model.training
    work = copy.deepcopy(model).eval()
    gm = _trace(work)
    _shapes(gm, examples, type(model).__name__)
    _swap_layers(gm, config, tgt, w_range)
    modules = dict(gm.named_modules())
    op_types = {op for op in tgt.quantization.op_types if op not in tgt.quantization.float_op_types}
    qmin, qmax = _activation_range(tgt)
    nodes, caps, ops = place(gm.graph, modules, op_types, tgt.quantization.activation_symmetric)
    if not {"Conv", "Gemm", "MatMul"} & set(ops):
        raise UnsupportedOnTarget(f"target {tgt.name} quantizes none of the layers of {type(model).__name__}: it "
                                  f"quantizes {', '.join(sorted(op_types))}, and QAT needs a Conv or Linear among them")
    first_compute = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node in nodes:
        name = f"aq_{node.name}"
        cap = caps.get(node)
        gm.add_submodule(name, ActQuant(qmin, qmax, symmetric=tgt.quantization.activation_symmetric,
                                        momentum=momentum, learnable=learn_scales,
                                        max_scale=cap / (qmax - qmin) if cap else float("inf")))
        with gm.graph.inserting_before(first_compute) if node.op == "placeholder" else \
                gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    _link_input_scales(gm)
    gm.graph.lint()
    gm.recompile()
    gm._edgequant_qat = _State(config, tgt, tuple(ops))
    log.info("QAT placement for %s: %d activation quantizers, quantized ops %s", tgt.name, len(nodes), ops)
    _calibrate(gm, calibration, examples, batch_size)
    return gm.train(was_training)


def _shapes(gm: Any, examples: tuple, model_name: str) -> None:
    """Run the traced model once on the examples, recording each node's output shape and dtype (for placement);
    a failure names the node's module and the reason."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    current: list[Any] = []

    class _Prop(ShapeProp):
        def run_node(self, n):
            current[:] = [n]
            return super().run_node(n)

    try:  # ShapeProp prints the traceback of a failing node itself; the error below says it in one line
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            _Prop(gm).propagate(*examples)
    except Exception as exc:
        cause = exc.__cause__ or exc
        node = current[0] if current else None
        where = f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})" \
            if node is not None and node.op == "call_module" else f"'{node.name if node is not None else 'forward'}'"
        shapes = ", ".join(str(tuple(getattr(e, "shape", ()))) for e in examples)
        reason = str(cause).splitlines()[0] if str(cause) else ""
        raise ExportError(f"cannot run {model_name} on the example inputs {shapes}: {where} failed: "
                          f"{type(cause).__name__}: {reason[:300]}") from exc


def _link_input_scales(gm: Any) -> None:
    """Give each quantized Conv/Linear the scale of its input's quantizer (through shape-only ops), so that its
    bias is rounded to the int32 grid s_x · s_w the device uses."""
    from .modules import ActQuant, QuantConv, QuantLinear
    from .place import DIRECT_OPS, onnx_op

    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], (QuantConv, QuantLinear)):
            continue
        src = node.args[0]
        while src is not None and not (src.op == "call_module" and isinstance(modules.get(src.target), ActQuant)):
            src = src.args[0] if onnx_op(src, modules) in DIRECT_OPS | {"pass"} and src.args else None
        if src is not None:
            with gm.graph.inserting_before(node):
                scale = gm.graph.get_attr(f"{src.target}.scale")
            node.args = (node.args[0], scale)


def _trace(module: Any) -> Any:
    """``torch.fx`` symbolic trace; a failure names the module being traced and the reason."""
    from torch import fx

    stack: list[str] = []
    failed: list[str] = []  # the innermost module being traced when tracing failed

    class _Tracer(fx.Tracer):
        def call_module(self, m, forward, args, kwargs):
            stack.append(f"{self.path_of_module(m) or type(module).__name__}' ({type(m).__name__})")
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if not failed:
                    failed.append(stack[-1])
                raise
            finally:
                stack.pop()

    tracer = _Tracer()
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        where = f"module '{failed[0]}" if failed else f"{type(module).__name__}.forward"
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ExportError(f"cannot prepare {type(module).__name__} for QAT: {where} cannot be traced by torch.fx: "
                          f"{type(exc).__name__}: {reason[:300]}. Remove data-dependent Python control flow from "
                          "its forward()") from exc
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _swap_layers(gm: Any, config: QATConfig, tgt: Target, w_range: tuple[int, int]) -> None:
    """Conv(+BatchNorm) → QuantConv, Linear → QuantLinear, for the op types the target quantizes."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from .modules import QuantConv, QuantLinear

    op_types = set(tgt.quantization.op_types) - set(tgt.quantization.float_op_types)
    per_channel = tgt.quantization.per_channel
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        new = None
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and "Conv" in op_types:
            bn_node = next(iter(node.users)) if len(node.users) == 1 else None
            bn = gm.get_submodule(bn_node.target) if bn_node is not None and bn_node.op == "call_module" else None
            if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats):
                bn = None
            if bn is not None:
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
                if config.bn == "fold":
                    m, bn = fuse_conv_bn_eval(m, bn), None
            new = QuantConv(m, bn, qmin=w_range[0], qmax=w_range[1], per_channel=per_channel)
        elif isinstance(m, nn.Linear) and {"Gemm", "MatMul"} & op_types:
            new = QuantLinear(m, qmin=w_range[0], qmax=w_range[1], per_channel=per_channel)
        if new is not None:
            parent, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
    gm.delete_all_unused_submodules()


def _calibrate(gm: Any, calibration: Any, examples: tuple, batch_size: int) -> None:
    """One pass over the calibration samples (or the example inputs) to initialise every activation range."""
    import torch

    from .modules import ActQuant

    quantizers = [m for m in gm.modules() if isinstance(m, ActQuant)]
    for q in quantizers:
        q.calibrating = True
    gm.eval()
    try:
        with torch.no_grad():
            for batch in _torch_batches(gm, calibration, batch_size) if calibration is not None else [examples]:
                gm(*batch) if isinstance(batch, tuple) else gm(**batch)
    finally:
        for q in quantizers:
            q.calibrating = False


def _torch_batches(gm: Any, data: Any, batch_size: int, preprocess: ImagePreprocess | None = None):
    import torch

    from ..graph.sessions import batches
    from ..frontend.torch_export import input_names_of

    samples = load_samples(data, preprocess=preprocess).bind(input_names_of(gm))
    for batch in batches(samples, batch_size, {}):
        yield {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in batch.items()}


def freeze_observers(qmodel: Any) -> int:
    """Stop every activation range from moving (learned scales keep training); returns how many were frozen.
    Call it late in training, e.g. for the last epochs, so the final steps see the ranges the device will use."""
    from .modules import ActQuant

    gm, _ = unwrap(qmodel, "qat.freeze_observers")
    count = 0
    for m in gm.modules():
        if isinstance(m, ActQuant):
            m.observing.fill_(False)
            count += 1
    return count


def unwrap(qmodel: Any, what: str) -> tuple[Any, _State]:
    """A prepared module (or one inside a DDP / Lightning Fabric wrapper) → (the module, its QAT state); ``what``
    names the caller in the error for a module that was not prepared."""
    seen = qmodel
    for _ in range(4):
        state = vars(seen).get("_edgequant_qat")  # the module itself, not a wrapper forwarding attributes
        if isinstance(state, _State):
            return seen, state
        inner = getattr(seen, "module", None)
        if inner is None or inner is seen:
            break
        seen = inner
    raise ExportError(f"{what} needs a module returned by edgequant.qat.prepare (or one wrapped by DDP or Lightning "
                      f"Fabric), not a plain {type(qmodel).__name__}: call edgequant.qat.prepare(model, ...) first")


def save_checkpoint(qmodel: Any, path: str | Path) -> None:
    """The QAT settings and weights (state dict) → one file for ``load_checkpoint`` or ``edgequant export
    MODEL --qat-checkpoint FILE``."""
    import torch

    gm, state = unwrap(qmodel, "qat.save_checkpoint")
    torch.save({"edgequant_qat": asdict(state.config), "state_dict": gm.state_dict()}, Path(path))


def load_checkpoint(model: Any, example_inputs: Any, path: str | Path) -> Any:
    """The float model, example inputs and a ``save_checkpoint`` file → the prepared, trained module."""
    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = QATConfig(**ckpt["edgequant_qat"])
        state_dict = ckpt["state_dict"]
    except FileNotFoundError:
        raise ExportError(f"QAT checkpoint {path} not found") from None
    except (KeyError, TypeError, RuntimeError, EOFError, OSError) as exc:
        raise ExportError(f"{path}: not a QAT checkpoint from edgequant.qat.save_checkpoint "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    qmodel = prepare(model, example_inputs, **{k: v for k, v in asdict(config).items()})
    try:
        qmodel.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit {type(model).__name__}: {str(exc).splitlines()[0]}; use the model "
                          "the checkpoint was trained from") from None
    return qmodel.eval()


def export(qmodel: Any, *, out: str | Path, calibration: Any, preprocess: ImagePreprocess | None = None,
           batch_size: int = 16, force: bool = False, progress: bool = True) -> Bundle:
    """A prepared (trained) module and check samples → the int8 bundle, as ``edgequant.export`` writes it, with
    the scales learned in training. ``calibration`` gives the input shapes and the samples on which the int8
    graph is compared with the fp32 graph and with the QAT model itself."""
    from ..jobs import run_job  # the job runner sits above the stages, and the QAT stages above this module

    config = ExportConfig.from_options(qmodel, calibration, out=out, force=force, progress=progress,
                                       preprocess=preprocess, batch_size=batch_size)
    return run_job(config, "qat")


def export_checkpoint(model: Any, checkpoint: str | Path, calibration: Any, *, out: str | Path,
                      preprocess: ImagePreprocess | None = None, batch_size: int = 16, force: bool = False,
                      progress: bool = True) -> Bundle:
    """A float model reference (as for ``edgequant.export``), a ``save_checkpoint`` file and samples → the QAT
    bundle. The target and settings are those the checkpoint was trained with."""
    import edgequant

    return edgequant.export(model, calibration, out=out, qat_checkpoint=checkpoint, preprocess=preprocess,
                            batch_size=batch_size, force=force, progress=progress)
