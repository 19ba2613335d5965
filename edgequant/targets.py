"""Target profiles: ``toolchains/*.toml`` (or a user's own file) → a frozen, validated :class:`Target`.

A target is data. Everything that differs between execution providers (activation dtype, symmetry,
per-channel rules, which op types are quantized, the provider chain and its options) lives in the profile;
no other module branches on a provider's name. Unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import TargetError

__all__ = ["ARITHMETICS", "ProviderSpec", "QuantSpec", "RuntimeSpec", "Target", "list_targets", "load_target"]

_DTYPES = ("int8", "uint8")
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_KERNELS = ("ort-cpu", "declared")
# How the target's int8 kernels compute (see RuntimeSpec.arithmetic).
ARITHMETICS = ("exact", "host-kernels", "vnni-kernels")


@dataclass(frozen=True)
class QuantSpec:
    """How tensors are quantized: q = clamp(round(x / scale) + zero_point, qmin, qmax)."""

    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    per_channel: bool = True
    per_channel_op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    float_op_types: tuple[str, ...] = ()
    # ops whose output stays float (DQ → MatMul → float: ORT's MatMulIntegerToFloat), no output requantization
    float_output_op_types: tuple[str, ...] = ()
    # MatMul/Gemm only where an input is a constant weight (activation × activation products stay float)
    constant_weight_only: bool = False
    # Regular expressions (searched in node names): the weights of matching MatMul nodes are stored as
    # full-range uint8 instead (U8U8 kernels, which sum in 32 bits), ignoring weight_dtype and reduce_range.
    uint8_weight_nodes: tuple[str, ...] = ()
    # The target's u8·s8 kernels add pairs of products in saturating 16 bits (x86 AVX2 without VNNI): each
    # output channel keeps the widest weight range (8 bits down to 7) whose pair sums provably, or measured on
    # the calibration data, stay within int16 (edgequant.quantize.saturation). Instead of reduce_range.
    pair_saturation: bool = False
    # Depthwise convolutions whose channel count is not a multiple of this are padded with zero channels up to
    # one (edgequant.transforms.channel_pad): MLAS's fast symmetric int8 depthwise kernels need multiples of 16
    # on x86-64. 0: never.
    depthwise_channel_align: int = 0
    # Graph inputs read only by dense convolutions (an RGB image) are padded with zero channels to a multiple of
    # this in front of them: the same kernels take input channels in multiples of 4. 0: never.
    input_channel_align: int = 0
    # DQ → HardSigmoid → Q runs as an int8 Add whose output scale clamps and rescales it (QLinearAdd on the CPU
    # provider, which has no int8 HardSigmoid; edgequant.quantize.hardsigmoid).
    int8_hardsigmoid: bool = False
    # Softmax over an outer axis of a Transpose's output moved in front of the Transpose, over the axis that is
    # one of the two innermost there (edgequant.graph.rewrite.softmax_inner_axis; exact): ONNX Runtime's CPU
    # Softmax transposes an outer axis element by element.
    softmax_inner_axis: bool = False
    # Conv/Gemm/MatMul nodes whose int8 kernel is slower than float plus the Q/DQ a float node adds (ONNX Runtime's
    # profiles of both graphs; edgequant.check.node_times) stay float, where the whole graph is then faster. Only
    # where the build machine computes the target's kernels.
    float_where_faster: bool = False

    def __post_init__(self) -> None:
        for pattern in self.uint8_weight_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise TargetError(f"uint8_weight_nodes entry {pattern!r} is not a regular expression ({exc})") from None
        if self.uint8_weight_nodes and self.activation_dtype != "uint8":
            raise TargetError("uint8_weight_nodes needs activation_dtype = \"uint8\" (int8 activations with uint8 "
                             "weights have no kernel in ONNX Runtime)")
        for key in ("activation_dtype", "weight_dtype"):
            if getattr(self, key) not in _DTYPES:
                raise TargetError(f"{key} must be one of {', '.join(_DTYPES)}, not {getattr(self, key)!r}")
        if self.activation_dtype == "int8" and self.weight_dtype == "uint8":
            raise TargetError("int8 activations with uint8 weights has no kernel in ONNX Runtime; use int8 weights")
        if self.pair_saturation and (self.reduce_range or self.activation_dtype != "uint8"):
            raise TargetError("pair_saturation is for uint8 activations with full-range weights: set reduce_range = "
                             "false (it makes every weight 7-bit) and activation_dtype = \"uint8\"")
        for key in ("depthwise_channel_align", "input_channel_align"):
            if not 0 <= getattr(self, key) <= 256:
                raise TargetError(f"{key} must be between 0 (off) and 256, not {getattr(self, key)}")
        if not self.op_types:
            raise TargetError("op_types is empty: list the op types to quantize, e.g. [\"Conv\", \"MatMul\", \"Gemm\"]")


@dataclass(frozen=True)
class ProviderSpec:
    """One ONNX Runtime execution provider, its options, and what it runs in int8.

    ``kernels = "ort-cpu"``: which nodes run in int8 is read from ONNX Runtime's own optimized CPU graph.
    ``kernels = "declared"``: from the fields below — the QDQ op types it runs in int8, the activation/weight
    dtype pairs it accepts (``"uint8/int8"``), whether zero points must be 0, which ops may have per-channel
    weights, and whether it needs fixed input shapes.
    """

    name: str
    options: tuple[tuple[str, str], ...] = ()
    kernels: str = "declared"
    int8_op_types: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ("uint8/int8", "int8/int8", "uint8/uint8")
    symmetric_activations: bool = False
    symmetric_weights: bool = False
    per_channel_op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    static_shapes: bool = False

    def __post_init__(self) -> None:
        if self.kernels not in _KERNELS:
            raise TargetError(f"kernels must be one of {', '.join(_KERNELS)}, not {self.kernels!r}")
        for pair in self.dtypes:
            act, _, wt = pair.partition("/")
            if act not in _DTYPES or wt not in _DTYPES:
                raise TargetError(f"dtypes entry {pair!r} must be ACTIVATION/WEIGHT, e.g. \"uint8/int8\"")

    def options_dict(self) -> dict[str, str]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options_dict(), "kernels": self.kernels,
                "int8_op_types": list(self.int8_op_types), "dtypes": list(self.dtypes),
                "symmetric_activations": self.symmetric_activations, "symmetric_weights": self.symmetric_weights,
                "per_channel_op_types": list(self.per_channel_op_types), "static_shapes": self.static_shapes}


@dataclass(frozen=True)
class RuntimeSpec:
    """How the device runs the bundle."""

    providers: tuple[ProviderSpec, ...] = (ProviderSpec("CPUExecutionProvider", kernels="ort-cpu"),)
    graph_optimization_level: str = "all"
    intra_op_num_threads: int = 0
    session_config: tuple[tuple[str, str], ...] = ()
    static_shapes: bool = False
    cpu_int8_fusion: bool = True
    # What the target's int8 kernels compute, which decides how the exporter measures the int8 graph:
    #   "exact"        int32 sums without saturation, rounding as the ONNX QDQ reference (ARM NEON/SDOT/i8mm,
    #                  XNNPACK, TensorRT, NNAPI): measured with ONNX Runtime at level "basic", no QDQ fusion,
    #                  which equals aarch64 ONNX Runtime bit for bit, on any build machine;
    #   "host-kernels" ONNX Runtime's fused CPU kernels with weights that cannot saturate anywhere (7-bit or
    #                  u8*u8): the build machine's own kernels compute what the device does;
    #   "vnni-kernels" x86 fused kernels that need VNNI (full-range u8*s8): the build machine's kernels when it
    #                  has AVX-512 VNNI or AVX-VNNI, exact arithmetic otherwise.
    arithmetic: str = "exact"

    def __post_init__(self) -> None:
        if self.arithmetic not in ARITHMETICS:
            raise TargetError(f"arithmetic must be one of {', '.join(ARITHMETICS)}, not {self.arithmetic!r}")
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise TargetError(f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}")
        if not self.providers:
            raise TargetError("providers is empty: name at least CPUExecutionProvider")
        if self.intra_op_num_threads < 0:
            raise TargetError("intra_op_num_threads must be >= 0 (0 lets ONNX Runtime choose)")


@dataclass(frozen=True)
class Target:
    """A validated target profile."""

    name: str
    description: str
    opset: int
    quantization: QuantSpec
    runtime: RuntimeSpec
    source: str = field(default="", compare=False)
    # the [quantization] keys a user's own profile file sets (built-in profiles: none): a kernel choice set there
    # is honoured even where it does not pay on a model (edgequant.jobs.choices)
    explicit: tuple[str, ...] = field(default=(), compare=False)

    @property
    def full_range_weights(self) -> bool:
        """8-bit weights with all 8 bits: x86 CPUs without VNNI saturate on them in ONNX Runtime's fused
        u8*s8 kernels (16-bit pair sums), so the device adapter refuses such a bundle there. Not with
        ``reduce_range`` (7-bit) nor ``pair_saturation`` (each channel's range keeps its pair sums in int16)."""
        q = self.quantization
        return q.weight_dtype == "int8" and not q.reduce_range and not q.pair_saturation

    @property
    def needs_vnni_on_x86(self) -> bool:
        """Full-range weights that ONNX Runtime's CPU provider fuses (QDQ fusion is a level-2 rewrite): an x86
        CPU without VNNI computes them with saturating 16-bit pair sums."""
        r = self.runtime
        return self.full_range_weights and r.cpu_int8_fusion and r.graph_optimization_level in ("extended", "all")

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain data, for the manifest."""
        q, r = self.quantization, self.runtime
        return {
            "name": self.name,
            "description": self.description,
            "opset": self.opset,
            "quantization": {
                "activation_dtype": q.activation_dtype,
                "weight_dtype": q.weight_dtype,
                "activation_symmetric": q.activation_symmetric,
                "weight_symmetric": q.weight_symmetric,
                "per_channel": q.per_channel,
                "per_channel_op_types": list(q.per_channel_op_types),
                "reduce_range": q.reduce_range,
                "pair_saturation": q.pair_saturation,
                "op_types": list(q.op_types),
                "float_op_types": list(q.float_op_types),
                "float_output_op_types": list(q.float_output_op_types),
                "constant_weight_only": q.constant_weight_only,
                "uint8_weight_nodes": list(q.uint8_weight_nodes),
                "depthwise_channel_align": q.depthwise_channel_align,
                "input_channel_align": q.input_channel_align,
                "int8_hardsigmoid": q.int8_hardsigmoid,
                "softmax_inner_axis": q.softmax_inner_axis,
                "float_where_faster": q.float_where_faster,
            },
            "runtime": {
                "providers": [p.to_dict() for p in r.providers],
                "graph_optimization_level": r.graph_optimization_level,
                "intra_op_num_threads": r.intra_op_num_threads,
                "session_config": dict(r.session_config),
                "static_shapes": r.static_shapes,
                "cpu_int8_fusion": r.cpu_int8_fusion,
                "arithmetic": r.arithmetic,
            },
        }


def _builtin_dir():
    return resources.files("edgequant._toolchains")


def list_targets() -> list[Target]:
    """All built-in profiles, sorted by name."""
    out = []
    for entry in sorted(_builtin_dir().iterdir(), key=lambda e: e.name.removesuffix(".toml")):
        if entry.name.endswith(".toml"):
            out.append(_parse(entry.read_text(encoding="utf-8"), entry.name))
    return out


def load_target(target: str | Path | Target) -> Target:
    """A built-in profile name (``"rpi5"``) or a path to a ``.toml`` file → :class:`Target`."""
    if isinstance(target, Target):
        return target
    text = str(target)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise TargetError(f"target profile {text} not found: give an existing .toml file or a built-in name "
                              f"({', '.join(t.name for t in list_targets())})")
        return _parse(path.read_text(encoding="utf-8"), str(path), user=True)
    entry = _builtin_dir() / f"{text}.toml"
    if not entry.is_file():
        names = ", ".join(t.name for t in list_targets())
        raise TargetError(f"unknown target {text!r}: pick one of {names}, or pass a path to your own .toml")
    return _parse(entry.read_text(encoding="utf-8"), entry.name)


_TOP = {"name", "description", "opset", "quantization", "runtime"}
_Q = set(QuantSpec.__dataclass_fields__)
_R = set(RuntimeSpec.__dataclass_fields__) - {"providers"} | {"providers"}
_P = set(ProviderSpec.__dataclass_fields__)


def _check_keys(table: dict, allowed: set[str], where: str, source: str) -> None:
    for key in table:
        if key not in allowed:
            raise TargetError(f"{source}: unknown key {where}{key!r}; allowed keys: {', '.join(sorted(allowed))}")


def _typed(value: Any, kind: type, key: str, source: str) -> Any:
    if kind is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TargetError(f"{source}: {key} must be a list of strings, not {value!r}")
        return tuple(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise TargetError(f"{source}: {key} must be {kind.__name__}, not {value!r}")
    return value


def _parse(text: str, source: str, user: bool = False) -> Target:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{source}: not valid TOML ({exc})") from None
    _check_keys(data, _TOP, "", source)
    for key in ("name", "opset"):
        if key not in data:
            raise TargetError(f"{source}: missing required key {key!r}")
    q_table = data.get("quantization", {})
    r_table = data.get("runtime", {})
    if not isinstance(q_table, dict) or not isinstance(r_table, dict):
        raise TargetError(f"{source}: [quantization] and [runtime] must be tables")
    _check_keys(q_table, _Q, "quantization.", source)
    _check_keys(r_table, _R, "runtime.", source)
    q_kwargs = _fields(q_table, QuantSpec, "quantization.", source)
    r_kwargs: dict[str, Any] = {}
    for key, value in r_table.items():
        if key == "providers":
            r_kwargs[key] = _providers(value, source)
        elif key == "session_config":
            if not isinstance(value, dict):
                raise TargetError(f"{source}: runtime.session_config must be a table of strings")
            r_kwargs[key] = tuple(sorted((str(k), str(v)) for k, v in value.items()))
        else:
            r_kwargs.update(_fields({key: value}, RuntimeSpec, "runtime.", source))
    opset = _typed(data["opset"], int, "opset", source)
    if not 13 <= opset <= 23:
        raise TargetError(f"{source}: opset {opset} is out of range; per-channel int8 needs opset >= 13 (use 17-21)")
    try:
        quant = QuantSpec(**q_kwargs)
    except TargetError as exc:
        raise TargetError(f"{source}: [quantization] {exc}") from None
    try:
        runtime = RuntimeSpec(**r_kwargs)
    except TargetError as exc:
        raise TargetError(f"{source}: [runtime] {exc}") from None
    _check_primary(quant, runtime, source)
    return Target(
        name=_typed(data["name"], str, "name", source),
        description=str(data.get("description", "")),
        opset=opset,
        quantization=quant,
        runtime=runtime,
        source=source,
        explicit=tuple(sorted(q_table)) if user else (),
    )


def _providers(value: Any, source: str) -> tuple[ProviderSpec, ...]:
    if not isinstance(value, list):
        raise TargetError(f"{source}: runtime.providers must be a list of tables like {{ name = \"CPUExecutionProvider\" }}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "name" not in item:
            raise TargetError(f"{source}: runtime.providers[{i}] needs a 'name'")
        _check_keys(item, _P, f"runtime.providers[{i}].", source)
        options = item.get("options", {})
        if not isinstance(options, dict):
            raise TargetError(f"{source}: runtime.providers[{i}].options must be a table")
        rest = {k: v for k, v in item.items() if k not in ("name", "options")}
        kwargs = _fields(rest, ProviderSpec, f"runtime.providers[{i}].", source)
        try:
            out.append(ProviderSpec(_typed(item["name"], str, f"runtime.providers[{i}].name", source),
                                    tuple(sorted((str(k), str(v)) for k, v in options.items())), **kwargs))
        except TargetError as exc:
            raise TargetError(f"{source}: runtime.providers[{i}].{exc}") from None
    return tuple(out)


def _fields(table: dict, cls: type, where: str, source: str) -> dict[str, Any]:
    """TOML values → constructor keywords of dataclass ``cls``, each checked against the field's type."""
    kinds = {"str": str, "bool": bool, "int": int, "tuple[str, ...]": tuple}
    out = {}
    for key, value in table.items():
        out[key] = _typed(value, kinds[str(cls.__dataclass_fields__[key].type)], f"{where}{key}", source)
    return out


def _check_primary(q: QuantSpec, r: RuntimeSpec, source: str) -> None:
    """The quantization must be one the first (preferred) provider accepts, as that provider declares it."""
    p = r.providers[0]
    pair = f"{q.activation_dtype}/{q.weight_dtype}"
    if pair not in p.dtypes:
        raise TargetError(f"{source}: quantization.activation_dtype/weight_dtype {pair} is refused by {p.name} "
                          f"(it takes {', '.join(p.dtypes)}); change quantization.activation_dtype or weight_dtype")
    if p.symmetric_activations and not q.activation_symmetric:
        raise TargetError(f"{source}: quantization.activation_symmetric must be true: {p.name} needs activation "
                          "zero points of 0")
    if p.symmetric_weights and not q.weight_symmetric:
        raise TargetError(f"{source}: quantization.weight_symmetric must be true: {p.name} needs weight zero "
                          "points of 0")
    if q.uint8_weight_nodes and "uint8/uint8" not in p.dtypes:
        raise TargetError(f"{source}: quantization.uint8_weight_nodes asks for uint8 weights, which {p.name} refuses "
                          f"(it takes {', '.join(p.dtypes)}); remove uint8_weight_nodes")
    extra = sorted(set(q.per_channel_op_types) - set(p.per_channel_op_types)) if q.per_channel else []
    if extra:
        raise TargetError(f"{source}: quantization.per_channel_op_types lists {', '.join(extra)}, but {p.name} takes "
                          f"per-channel weights only for {', '.join(p.per_channel_op_types) or 'no op'}")
    if r.arithmetic == "host-kernels" and q.weight_dtype == "int8" and not (q.reduce_range or q.pair_saturation):
        raise TargetError(f"{source}: runtime.arithmetic \"host-kernels\" needs weights that cannot saturate on x86 "
                          "CPUs without VNNI: set quantization.pair_saturation = true (or reduce_range), or arithmetic = \"vnni-kernels\" "
                          "(x86 with VNNI) or \"exact\" (ARM, GPUs, NPUs)")
    if p.static_shapes and not r.static_shapes:
        raise TargetError(f"{source}: runtime.static_shapes must be true: {p.name} needs fixed input shapes")
