"""The PyTorch side of quantization-aware training: fake quantizers and the Conv/Linear wrappers that
``edgequant.qat.prepare`` puts into a model.

Fake quantization computes in float what the int8 graph computes:
x̂ = (clamp(round(x / s) + z, qmin, qmax) − z) · s,
with a straight-through gradient. Activations use one scale per tensor, observed (min/max) from batches and then
optionally learned (LSQ: the gradient of x̂ with respect to s, scaled by 1/√(numel · qmax)). Weights use one
symmetric scale per output channel, s_c = 2·max|w_c| / (qmax − qmin), recomputed from the weights at each step,
exactly as ONNX Runtime's quantizer computes it (``compute_scale_zp``). The scales and integer ranges mirror the
target profile, so that the exported QuantizeLinear/DequantizeLinear nodes reproduce this arithmetic.

torch.ao's QAT modules are not used: their observers and fusions assume PyTorch's own int8 backends (fbgemm,
qnnpack) and their ranges, not the profile of an ONNX Runtime target, and torch 2.13 no longer exports them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ActQuant", "FixedQuant", "QuantConv", "QuantLinear", "fixed_copy", "quantize_dequantize",
           "quantize_dequantize_onnx", "scale_zero_point", "weight_scale"]


def scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                     symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A range → (scale, zero point) as ONNX Runtime computes them: the range is widened to hold 0 (and at least
    1e-4 wide), made symmetric if asked, and scale = (hi − lo) / (qmax − qmin), z = round(qmin − lo / scale)."""
    lo = torch.clamp(lo.double(), max=0.0)
    hi = torch.clamp(hi.double(), min=0.0)
    hi = torch.maximum(hi, lo + 1e-4)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -amax, amax
    scale = (hi - lo) / (qmax - qmin)
    if symmetric:
        zp = torch.full_like(scale, round((qmin + qmax) / 2.0))
    else:
        zp = torch.round(qmin - lo / scale.float().double())
    return scale.float(), torch.clamp(zp, qmin, qmax).to(torch.int32)


def weight_scale(w: torch.Tensor, qmin: int, qmax: int, per_channel: bool) -> torch.Tensor:
    """Symmetric weight scale, per output channel (axis 0) or per tensor: 2·max|w| / (qmax − qmin)."""
    amax = w.detach().abs().flatten(1).amax(1) if per_channel else w.detach().abs().max().reshape(1)
    scale = (2.0 * amax.double() / (qmax - qmin)).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class ActQuant(nn.Module):
    """Per-tensor activation fake quantizer with a min/max observer.

    While ``observing`` (until :func:`edgequant.qat.freeze_observers`), each training batch moves the range:
    plain min/max during a calibration pass, an exponential moving average (``momentum``) during training. Under
    torch.distributed the batch extremes are all-reduced first, so that every process holds the same scales.
    ``learnable`` makes the scale a parameter, trained once the observer is frozen. ``max_scale`` caps the scale
    where the quantized range must stay inside a preceding clip (ReLU6), so the clip stays redundant on device.
    """

    def __init__(self, qmin: int, qmax: int, *, symmetric: bool = False, momentum: float = 0.01,
                 learnable: bool = False, max_scale: float = math.inf) -> None:
        super().__init__()
        self.qmin, self.qmax, self.symmetric, self.momentum = qmin, qmax, symmetric, momentum
        self.learnable, self.max_scale = learnable, max_scale
        self.calibrating = False
        self.register_buffer("lo", torch.zeros(1))
        self.register_buffer("hi", torch.zeros(1))
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.bool))
        self.register_buffer("observing", torch.ones(1, dtype=torch.bool))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        if learnable:
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scale", torch.ones(1))

    def extra_repr(self) -> str:
        return f"qmin={self.qmin}, qmax={self.qmax}, symmetric={self.symmetric}, learnable={self.learnable}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch into the range and recompute scale and zero point."""
        ext = torch.stack([-x.detach().min(), x.detach().max()]).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)
        lo, hi = -ext[0:1], ext[1:2]
        if not bool(self.initialized):
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.initialized.fill_(True)
        elif self.calibrating:
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        else:
            self.lo.add_(self.momentum * (lo - self.lo))
            self.hi.add_(self.momentum * (hi - self.hi))
        scale, zp = scale_zero_point(self.lo, self.hi, self.qmin, self.qmax, self.symmetric)
        self.scale.copy_(torch.clamp(scale, max=self.max_scale))
        self.zero_point.copy_(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.observing) and (self.training or self.calibrating):
            self.observe(x)
        if not bool(self.initialized):
            return x
        if self.learnable:  # keep the learned scale in bounds, so every reader of it (biases, export) agrees
            with torch.no_grad():
                self.scale.clamp_(min=1e-8, max=self.max_scale)
        if self.learnable and self.training and not bool(self.observing):
            scale = self.scale
            grad_factor = 1.0 / math.sqrt(x.numel() * max(self.qmax, 1))
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, self.zero_point.float(), self.qmin, self.qmax, grad_factor)
        scale = torch.clamp(self.scale.detach(), min=1e-8, max=self.max_scale)
        return torch.fake_quantize_per_tensor_affine(x, scale, self.zero_point, self.qmin, self.qmax)


class _WeightQuant(nn.Module):
    """Shared weight handling of :class:`QuantConv` and :class:`QuantLinear`."""

    def __init__(self, qmin: int, qmax: int, per_channel: bool) -> None:
        super().__init__()
        self.w_qmin, self.w_qmax, self.per_channel = qmin, qmax, per_channel

    def quantized_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quantized weight and its scale."""
        scale = weight_scale(w, self.w_qmin, self.w_qmax, self.per_channel)
        zp = torch.zeros(scale.shape, dtype=torch.int32)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, self.w_qmin, self.w_qmax), scale
        return torch.fake_quantize_per_tensor_affine(w, scale, zp, self.w_qmin, self.w_qmax), scale

    @staticmethod
    def rounded_bias(b: torch.Tensor | None, w_scale: torch.Tensor,
                     input_scale: torch.Tensor | None) -> torch.Tensor | None:
        """The bias on the int32 grid the device adds it on, s_x · s_w (straight-through gradient)."""
        if b is None or input_scale is None:
            return b
        step = (input_scale.detach().reshape(()).float() * w_scale).double()
        return b + (torch.round(b.detach().double() / step) * step - b.detach().double()).float()


class QuantConv(_WeightQuant):
    """Conv with fake-quantized weights; an optional BatchNorm is frozen (running statistics, affine parameters
    still trained) and folded on the fly: w' = w · γ / √(σ² + ε), b' = β + (b − μ) · γ / √(σ² + ε)."""

    def __init__(self, conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm | None, *,
                 qmin: int, qmax: int, per_channel: bool) -> None:
        super().__init__(qmin, qmax, per_channel)
        self.conv = conv
        self.bn = bn

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the device computes with (before weight quantization)."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b
        bn = self.bn
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        b0 = b if b is not None else torch.zeros_like(bn.running_mean)
        return w * factor.reshape(-1, *[1] * (w.dim() - 1)), beta + (b0 - bn.running_mean) * factor

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self.folded()
        wq, w_scale = self.quantized_weight(w)
        return self.conv._conv_forward(x, wq, self.rounded_bias(b, w_scale, input_scale))


class QuantLinear(_WeightQuant):
    """Linear with fake-quantized weights (per output feature)."""

    def __init__(self, linear: nn.Linear, *, qmin: int, qmax: int, per_channel: bool) -> None:
        super().__init__(qmin, qmax, per_channel)
        self.linear = linear

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        wq, w_scale = self.quantized_weight(self.linear.weight)
        return F.linear(x, wq, self.rounded_bias(self.linear.bias, w_scale, input_scale))


@torch.library.custom_op("edgequant::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)) with ONNX's semantics; ``zero_point``'s dtype (uint8/int8) sets the
    range. An opaque op for ``torch.export`` (its fake-quantize kernels have no export support in torch 2.13),
    written to ONNX as the QuantizeLinear → DequantizeLinear pair by :func:`quantize_dequantize_onnx`."""
    lo, hi = (0, 255) if zero_point.dtype == torch.uint8 else (-128, 127)
    zp = zero_point.to(torch.int32)
    if scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), lo, hi)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, lo, hi)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, axis):
    return torch.empty_like(x)


def quantize_dequantize_onnx(x, scale, zero_point, axis: int):
    """The ONNX translation of :func:`quantize_dequantize` for ``torch.onnx.export(custom_translation_table=)``."""
    from onnxscript import opset18 as op

    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, axis=axis), scale, zero_point, axis=axis)


class FixedQuant(nn.Module):
    """The export form of a fake quantizer: constant scale and zero point, an ONNX-legal integer range
    ((0, 255) or (-128, 127)), written as QuantizeLinear → DequantizeLinear. A narrower range (7-bit or
    symmetric weights) is kept by the scale: every |x / s| already lies inside it."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, unsigned: bool, axis: int | None) -> None:
        super().__init__()
        self.axis = 0 if axis is None else axis
        shape = () if axis is None else scale.shape
        self.register_buffer("scale", scale.detach().clone().float().reshape(shape))
        self.register_buffer("zero_point", zero_point.detach().clone().reshape(shape).to(
            torch.uint8 if unsigned else torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.scale, self.zero_point, self.axis)


class _FixedLayer(nn.Module):
    """The export form of :class:`QuantConv` / :class:`QuantLinear`: folded float weight, its quantizer, bias."""

    def __init__(self, layer: QuantConv | QuantLinear) -> None:
        super().__init__()
        with torch.no_grad():
            w, b = layer.folded()
            scale = weight_scale(w, layer.w_qmin, layer.w_qmax, layer.per_channel)
        self.conv_args = None
        if isinstance(layer, QuantConv):
            c = layer.conv
            if c.padding_mode != "zeros":
                raise NotImplementedError(f"padding_mode={c.padding_mode!r}")
            self.conv_args = (len(c.kernel_size), c.stride, c.padding, c.dilation, c.groups)
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        self.wq = FixedQuant(scale, torch.zeros(scale.shape, dtype=torch.int32), False,
                             0 if layer.per_channel else None)

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        w = self.wq(self.weight)  # the bias is rounded by the ONNX clean-up (qat.convert.int32_bias)
        if self.conv_args is None:
            return F.linear(x, w, self.bias)
        dims, stride, padding, dilation, groups = self.conv_args
        return getattr(F, f"conv{dims}d")(x, w, self.bias, stride, padding, dilation, groups)


def fixed_copy(module: nn.Module) -> nn.Module:
    """A prepared module → a copy (eval mode) whose quantizers are constants, ready for ``torch.onnx.export``."""
    import copy

    out = copy.deepcopy(module).eval()
    for name, child in list(out.named_modules()):
        if isinstance(child, ActQuant):
            new = FixedQuant(torch.clamp(child.scale.detach(), min=1e-8, max=child.max_scale),
                             child.zero_point, child.qmin >= 0, None)
        elif isinstance(child, (QuantConv, QuantLinear)):
            new = _FixedLayer(child)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, new)
    return out

