"""The export configuration: the user's options as one frozen, typed object, built the same way by
``edgequant.export(model, data, *, out, **options)`` and by ``edgequant export`` (one option, one field).

The config selects a job (PTQ, Hugging Face text, weight-only, QAT; see :mod:`edgequant.jobs`) and
:meth:`ExportConfig.validate` refuses, as a :class:`~edgequant.errors.UsageError` naming the option and why,
every option the selected job does not take: an option the user gave and silently did not get would ship the
wrong model. Fields left at ``None`` mean "the job's default" and are never refused.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .check.budget import AccuracyBudget
from .data.samples import ImagePreprocess
from .errors import UsageError, option, spelled
from .quantize.weight_only import DEFAULT_BLOCK_SIZE, WeightOnly
from .targets import Target
from .transforms.algorithms import Algorithms

__all__ = ["JOBS", "OPSETS", "CalibrationOptions", "DataOptions", "ExportConfig", "QATOptions", "TargetOptions",
           "TextOptions", "WeightOptions"]

JOBS = ("ptq", "text", "weight-only", "decoder", "qat")


@dataclass(frozen=True)
class DataOptions:
    """How the calibration data is read and split. ``input_shapes``: {input: shape with batch axis} ("" for the
    only input); ``labels``: one integer class per sample (array or .npy), for top1 budgets."""

    preprocess: ImagePreprocess | None = None
    num_samples: int | None = None
    batch_size: int = 16
    input_shapes: Mapping[str, Sequence[int]] | None = None
    labels: Any = None


@dataclass(frozen=True)
class TargetOptions:
    """Which device the bundle is for (a built-in name, a .toml file or a :class:`Target`) and the ONNX opset
    (None: the target's)."""

    target: str | Path | Target | None = None
    opset: int | None = None

    @property
    def name_or_default(self) -> str | Path | Target:
        return "generic-cpu" if self.target is None else self.target


@dataclass(frozen=True)
class CalibrationOptions:
    """How activation ranges are chosen (None: minmax) and which nodes stay float."""

    method: str | None = None
    exclude_nodes: tuple[str, ...] = ()
    layer_report: bool | None = None  # the per-layer error table (PTQ; None: on)
    allow_inaccurate: bool = False  # write the bundle even when the int8 model is grossly wrong (PTQ's gate)


@dataclass(frozen=True)
class WeightOptions:
    """Weight-only quantization: a preset (``q8``, ``q4``, ``q4-gptq``) and its block size (None: 32)."""

    weights: str | None = None
    block_size: int | None = None

    def config(self) -> WeightOnly | None:
        if self.weights is None:
            return None
        return WeightOnly(self.weights, block_size=DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size)


@dataclass(frozen=True)
class TextOptions:
    """Hugging Face text models: the task optimum exports (None: feature-extraction), tokens per sample (None:
    128) and ``dynamic`` int8 activations."""

    task: str | None = None
    max_length: int | None = None
    dynamic: bool = False


@dataclass(frozen=True)
class QATOptions:
    """A file from ``edgequant.qat.save_checkpoint``: export the QAT-trained model."""

    checkpoint: Path | None = None


# The opsets a bundle can be written at (QuantizeLinear's per-channel axis needs 13; models at any opset ONNX
# Runtime runs are converted to the one chosen).
OPSETS = range(13, 24)

# API keyword → (config part, field, CLI flag). The CLI and the API share this table.
OPTIONS: dict[str, tuple[str, str, str]] = {
    "preprocess": ("data", "preprocess", "--resize/--scale/--mean/--std/--channels/--layout"),
    "num_samples": ("data", "num_samples", "--num-samples"),
    "batch_size": ("data", "batch_size", "--batch-size"),
    "input_shapes": ("data", "input_shapes", "--input-shape"),
    "labels": ("data", "labels", "--labels"),
    "target": ("target", "target", "--target"),
    "opset": ("target", "opset", "--opset"),
    "method": ("calibration", "method", "--method"),
    "exclude_nodes": ("calibration", "exclude_nodes", "--exclude"),
    "layer_report": ("calibration", "layer_report", "--no-layer-report"),
    "allow_inaccurate": ("calibration", "allow_inaccurate", "--allow-inaccurate"),
    "algorithms": ("algorithms", "", "algorithms"),
    "accuracy_budget": ("budget", "", "--accuracy-budget"),
    "weights": ("weights", "weights", "--weights"),
    "block_size": ("weights", "block_size", "--block-size"),
    "task": ("text", "task", "--task"),
    "max_length": ("text", "max_length", "--max-length"),
    "dynamic": ("text", "dynamic", "--dynamic"),
    "qat_checkpoint": ("qat", "checkpoint", "--qat-checkpoint"),
}


# Algorithms' fields → their CLI flags (the API sets them on ``algorithms=Algorithms(...)``).
ALGORITHM_FLAGS = {"equalize": "--equalize", "bias_correction": "--bias-correction", "smooth_quant": "--smooth-quant",
                   "smooth_quant_alpha": "smooth_quant_alpha", "max_samples": "max_samples"}


def flag(name: str) -> str:
    """An API keyword → how the user who called us spells it (``--num-samples`` on the command line,
    ``num_samples`` from Python; see :func:`edgequant.errors.option`)."""
    if name in ALGORITHM_FLAGS:
        return spelled(cli=ALGORITHM_FLAGS[name], python=f"algorithms=Algorithms({name}=...)")
    if name in OPTIONS and OPTIONS[name][2].startswith("--"):
        return spelled(cli=OPTIONS[name][2], python=name)
    return option(name)


@dataclass(frozen=True)
class ExportConfig:
    """Everything one export needs: model, data, output folder and the options, one part per concern."""

    model: Any
    data: Any
    out: Path
    force: bool = False
    progress: bool = True
    data_options: DataOptions = field(default_factory=DataOptions)
    target: TargetOptions = field(default_factory=TargetOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    algorithms: Algorithms = field(default_factory=Algorithms)
    budget: AccuracyBudget | None = None
    weights: WeightOptions = field(default_factory=WeightOptions)
    text: TextOptions = field(default_factory=TextOptions)
    qat: QATOptions = field(default_factory=QATOptions)

    @classmethod
    def from_options(cls, model: Any, data: Any, *, out: str | Path, force: bool = False, progress: bool = True,
                     **options: Any) -> ExportConfig:
        """``edgequant.export``'s keywords → a config (not yet validated). An unknown keyword is a UsageError
        that suggests the closest known one."""
        parts: dict[str, dict[str, Any]] = {}
        budget = algorithms = None
        for key, value in options.items():
            if key not in OPTIONS:
                close = difflib.get_close_matches(key, OPTIONS, n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; options: {', '.join(sorted(OPTIONS))}"
                raise UsageError(f"edgequant.export() has no option {key!r}{hint}")
            part, name, _ = OPTIONS[key]
            if key == "accuracy_budget":
                budget = AccuracyBudget.parse(value) if isinstance(value, str) else value
            elif key == "algorithms":
                algorithms = value
            elif key == "exclude_nodes":
                parts.setdefault(part, {})[name] = tuple(value or ())
            elif key == "qat_checkpoint":
                parts.setdefault(part, {})[name] = None if value is None else Path(value)
            else:
                parts.setdefault(part, {})[name] = value
        return cls(model=model, data=data, out=Path(out), force=force, progress=progress,
                   data_options=DataOptions(**parts.get("data", {})),
                   target=TargetOptions(**parts.get("target", {})),
                   calibration=CalibrationOptions(**parts.get("calibration", {})),
                   algorithms=algorithms or Algorithms(), budget=budget,
                   weights=WeightOptions(**parts.get("weights", {})), text=TextOptions(**parts.get("text", {})),
                   qat=QATOptions(**parts.get("qat", {})))

    # --------------------------------------------------------------------------------------------- the job
    @property
    def job(self) -> str:
        """Which job these options select: ``qat`` (a QAT checkpoint), ``text`` (a Hugging Face model or text
        data, or ``dynamic``), ``weight-only`` (``weights``), else ``ptq``."""
        if self.qat.checkpoint is not None:
            return "qat"
        if _is_decoder(self.model, self.text.task):
            return "decoder"
        if self.text.dynamic or _is_text(self.model, self.data):
            return "text"
        if self.weights.weights is not None:
            return "weight-only"
        return "ptq"

    def given(self) -> dict[str, Any]:
        """The options that differ from "the job's default" → their values (API keywords)."""
        out: dict[str, Any] = {}
        for key, (part, name, _) in OPTIONS.items():
            if key == "accuracy_budget":
                value, default = self.budget, None
            elif key == "algorithms":
                for f in fields(Algorithms):  # one entry per algorithm, so a refusal names the one given
                    if getattr(self.algorithms, f.name) != f.default:
                        out[f.name] = getattr(self.algorithms, f.name)
                continue
            else:
                obj = getattr(self, "data_options" if part == "data" else part)
                value = getattr(obj, name)
                default = next(f.default for f in fields(obj) if f.name == name)
            if value is not default and (default is None or value != default):  # arrays: compared to None only
                out[key] = value
        return out

    def validate(self) -> ExportConfig:
        """Refuse every option the selected job does not take (UsageError naming the option and why); returns
        the config itself so that a call can be chained."""
        job, given = self.job, self.given()
        for key in given:
            why = _refusal("algorithms" if key in ALGORITHM_FLAGS else key, job, self)
            if why:
                raise UsageError(f"{flag(key)} {why}")
        if self.weights.block_size is not None and self.weights.weights is None:
            raise UsageError(f"{flag('block_size')} applies only to weight-only quantization: add "
                             f"{option('weights', 'q8')}, q4 or q4-gptq, or drop {option('block_size')}")
        wo = self.weights.config()  # the preset and block size check themselves
        if job == "weight-only" or (job == "text" and wo is not None):
            if "num_samples" in given and wo.method != "gptq":
                raise UsageError(f"{flag('num_samples')} limits GPTQ's calibration, but "
                                 f"{option('weights', wo.preset)} rounds weights without calibration data: drop "
                                 f"{option('num_samples')} or use {option('weights', 'q4-gptq')}")
        if self.data_options.num_samples is not None and self.data_options.num_samples < 1:
            raise UsageError(f"{flag('num_samples')} must be at least 1, not {self.data_options.num_samples}")
        opset = self.target.opset
        if opset is not None and not (isinstance(opset, int) and OPSETS[0] <= opset <= OPSETS[-1]):
            raise UsageError(f"{flag('opset')} {opset!r} is out of range: use {OPSETS[0]}-{OPSETS[-1]} (per-channel "
                             "int8 needs opset 13 or newer; a model at an older opset is converted up to it)")
        if self.data_options.batch_size < 1:
            raise UsageError(f"{flag('batch_size')} must be at least 1, not {self.data_options.batch_size}")
        if self.data_options.labels is not None and self.budget is None:
            raise UsageError(f"{flag('labels')} serve top1 accuracy budgets only: add "
                             f"{option('accuracy_budget', 'top1>=...')} or drop {option('labels')}")
        method = self.calibration.method
        if method is not None:
            from .calibration.streaming import METHODS

            allowed = (*METHODS, "auto") if job == "ptq" else METHODS
            if method not in allowed:
                raise UsageError(f"{flag('method')}: unknown calibration method {method!r} for the {job} job; use "
                                 f"one of {', '.join(allowed)}")
        return self


def _is_decoder(model: Any, task: str | None) -> bool:
    """A decoder for text generation: asked for with the task, or the folder's config names a causal LM."""
    from .frontend.hf import DECODER_TASKS, is_causal_lm, is_hf_folder

    return is_hf_folder(model) and (task in DECODER_TASKS or (task in (None, "feature-extraction")
                                                              and is_causal_lm(model)))


def _is_text(model: Any, data: Any) -> bool:
    from .data.text import is_text_path
    from .frontend.hf import HFModel, is_hf_folder

    texts = isinstance(data, (list, tuple)) and bool(data) and all(isinstance(t, str) for t in data)
    return isinstance(model, HFModel) or is_hf_folder(model) or is_text_path(data) or texts


_NOT_QAT = "does not apply to a QAT checkpoint: its training fixed it"
_DECODER_TAKES = ("target", "opset", "num_samples", "exclude_nodes", "weights", "block_size", "task")
_PTQ_ONLY = "applies only to post-training quantization with int8 activations (the gate and the per-layer table)"


def _refusal(key: str, job: str, cfg: ExportConfig) -> str | None:
    """Why option ``key`` does not apply to ``job`` (None: it applies)."""
    w = option("weights", cfg.weights.weights)
    if key == "allow_inaccurate" and job != "ptq":
        return _PTQ_ONLY
    if job == "decoder":
        if key in _DECODER_TAKES:
            return None
        if key == "dynamic":
            return f"does not apply to a decoder (text generation): its bundle quantizes weights only; use " \
                   f"{option('weights', 'q4')}"
        return "does not apply to a decoder (text generation): its job takes the target, opset, number of " \
               "samples, excluded nodes and the weight preset only"
    if job == "qat":
        return {
            "method": f"{_NOT_QAT} (the scales are learned in training, not calibrated)",
            "num_samples": f"{_NOT_QAT}: every sample of the data checks the int8 graph",
            "exclude_nodes": f"{_NOT_QAT}: leave the layer out of quantization in qat.prepare instead",
            "opset": f"{_NOT_QAT} (its target's opset)",
            "algorithms": f"{_NOT_QAT}: equalize the float model before qat.prepare instead",
            "accuracy_budget": f"{_NOT_QAT}: there is no float fallback search for QAT",
            "input_shapes": f"{_NOT_QAT} (the target's static_shapes decides)",
            "weights": f"does not combine with {option('qat_checkpoint')}: the QAT model quantizes activations too",
            "task": "applies only to Hugging Face models",
            "max_length": "applies only to Hugging Face text models",
            "layer_report": _PTQ_ONLY,
        }.get(key)
    if job == "text":
        if key == "dynamic" and cfg.weights.weights is not None:
            return f"quantizes activations, but {w} keeps them in float: choose one of the two"
        if key == "method" and cfg.text.dynamic:
            return f"chooses activation ranges, but {option('dynamic', True)} computes them at every run: drop " \
                   f"{option('method')}"
        if key == "method" and cfg.weights.weights is not None:
            return f"chooses activation ranges, but {w} keeps activations in float: drop {option('method')}"
        return {
            "preprocess": f"is for images; text data is tokenized ({option('max_length')})",
            "input_shapes": f"does not apply to text models: {option('max_length')} fixes the token axis",
            "algorithms": "does not apply to Hugging Face text models: their recipe always smooths the MatMul inputs "
                          "and keeps attention in float (docs/text.md); drop the option",
            "accuracy_budget": "does not apply to Hugging Face text models yet: use "
                               f"{option('exclude_nodes')} to keep nodes in float",
            "labels": "does not apply to Hugging Face text models",
            "layer_report": _PTQ_ONLY,
        }.get(key)
    if key in ("task", "max_length"):
        return "applies only to Hugging Face models (a model folder with text data)"
    if job == "weight-only":
        return {
            "method": f"chooses activation ranges, but {w} keeps activations in float: drop {option('method')}",
            "algorithms": f"rebalances int8 activations and weights, but {w} quantizes weights in blocks with their "
                          "own scales and keeps activations in float: drop the option",
            "accuracy_budget": f"searches which int8 nodes to keep in float; {w} has no int8 activations: use "
                               f"{option('exclude_nodes')} to keep a MatMul in float",
            "layer_report": _PTQ_ONLY,
        }.get(key)
    return None
