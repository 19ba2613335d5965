"""The stages the jobs share, and the state they pass along.

A stage is a function ``stage(run: Run) -> None``: it reads what earlier stages put on the :class:`Run` and adds
its own result (samples, fp32 graph, ranges, int8 graph, report parts). Stages pass objects, never paths; only
:func:`write` touches the disk. Each is small enough to test alone on a hand-made ``Run``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from ..bundle.core import Bundle, check_out_dir, write_bundle
from ..bundle.golden import add_selftest
from ..bundle.manifest import build_manifest
from ..bundle.report import holdout_block, new_report, sizes_block
from ..check.fidelity import cpu_kernels, fidelity
from ..config import ExportConfig
from ..data.holdout import sample_ids, split_holdout
from ..data.samples import load_samples
from ..frontend.shapes import batch_axes, check_data_fits, fix_input_shapes, resolve_input_shapes
from ..frontend.torch_export import export_fp32, input_names_of, load_model
from ..graph.sessions import checked_with
from ..targets import Target, load_target

__all__ = ["Run", "Stage", "check", "fixed_shapes", "kernels", "load", "open_run", "report_parts", "to_fp32", "write"]

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One export in progress: the validated config, its target, and what the stages have made so far.
    ``timings``: seconds per stage, filled in by the runner (:func:`edgequant.jobs.run`)."""

    config: ExportConfig
    target: Target
    opset: int
    t0: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    loaded: Any = None  # the model as loaded (nn.Module, ONNX, Hugging Face model)
    samples: Any = None  # all samples, bound to the model's input names
    calib: Any = None  # the calibration part
    holdout: Any = None  # the held-out part, for the checks
    labels: Any = None  # the held-out samples' labels (top1 budgets)
    fp32: onnx.ModelProto | None = None  # the reference graph the bundle carries
    work: onnx.ModelProto | None = None  # the fp32 graph the quantizer sees (after fp32 passes)
    shapes: dict | None = None  # fixed input shapes, where the target or the user asks for them
    ranges: dict | None = None
    quantize_fn: Callable | None = None  # (ranges, float nodes) → int8 model
    int8: onnx.ModelProto | None = None
    method: str = "minmax"  # what the report calls the method
    settings: dict[str, Any] = field(default_factory=dict)  # the manifest's "quantization" part
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    model_format: str = "onnx-qdq"
    preprocess: Any = None  # image pre-processing for the manifest
    parts: dict[str, Any] = field(default_factory=dict)  # the report's parts (bundle.report.REPORT_KEYS)
    files: dict[str, bytes] = field(default_factory=dict)  # extra bundle files
    checked: Any = None  # how the int8 graph is run for every figure (graph.sessions.CheckedWith)
    selftest_samples: Any = None  # the samples golden.npz carries (None: the held-out ones)
    bundle: Bundle | None = None
    fixed_batch: int | None = None  # a model whose batch axis is fixed runs in batches of exactly that size
    kernel_float: tuple[str, ...] = ()  # nodes kept float where the target's int8 kernel is slower (float_where_faster)

    def __post_init__(self) -> None:
        if self.checked is None:  # the target's arithmetic, unless a job knows better (text, QAT)
            self.checked = checked_with(self.target)

    @property
    def batch_size(self) -> int:
        return self.fixed_batch or self.config.data_options.batch_size


Stage = Callable[[Run], None]


def open_run(config: ExportConfig) -> Run:
    """A validated config → a Run with its target loaded and the output folder checked (nothing written)."""
    tgt = load_target(config.target.name_or_default)
    check_out_dir(config.out, config.force)
    return Run(config=config, target=tgt, opset=config.target.opset or tgt.opset)


def load(run: Run) -> None:
    """Load the data and the model; split the samples into calibration and held-out parts."""
    cfg = run.config
    samples = load_samples(cfg.data, preprocess=cfg.data_options.preprocess)
    if cfg.budget is not None:
        from ..check.budget import budget_labels

        run.labels = budget_labels(cfg.budget, cfg.data_options.labels, len(samples))
    run.loaded = load_model(cfg.model)
    run.samples = samples.bind(input_names_of(run.loaded))
    run.preprocess = run.samples.preprocess
    run.calib, run.holdout = split_holdout(run.samples, cfg.data_options.num_samples)


def to_fp32(run: Run, *, dynamic_batch: bool, prepare: Callable[[onnx.ModelProto, int], onnx.ModelProto]) -> None:
    """The loaded model → the fp32 reference graph (``prepare(graph, opset)``: the job's provider-independent
    clean-up); the samples learn each input's batch axis from it and are checked against it; fixed input
    shapes resolved where the target or the user wants them."""
    raw = export_fp32(run.loaded, run.samples, opset=run.opset, dynamic_batch=dynamic_batch)
    run.fp32 = prepare(raw, run.opset)
    axes = batch_axes(run.fp32, run.samples[0])  # each input's batch axis, from the graph
    run.samples, run.calib, run.holdout = (s.with_batch_axes(axes) for s in (run.samples, run.calib, run.holdout))
    check_data_fits(run.fp32, run.samples)
    wanted = run.config.data_options.input_shapes
    if run.target.runtime.static_shapes or wanted:
        run.shapes = resolve_input_shapes(run.fp32, run.samples[0], wanted)
    run.work = run.fp32


def check(run: Run) -> None:
    """The int8 graph against the fp32 one on the held-out samples, per output (edgequant.check.fidelity)."""
    batch = run.batch_size
    run.parts["fidelity"] = [f.to_dict() for f in fidelity(run.fp32, run.int8, run.holdout, batch_size=batch,
                                                           level=run.checked.level)]


def kernels(run: Run) -> None:
    """What ONNX Runtime's CPU provider runs in int8, on targets whose arithmetic the host's CPU kernels are."""
    found = cpu_kernels(run.int8) if run.target.runtime.cpu_int8_fusion else None
    run.parts["kernels"] = found.to_dict() if found else None


def fixed_shapes(run: Run) -> None:
    """Both graphs with the fixed input shapes (where there are any)."""
    if run.shapes:
        run.fp32, run.int8 = fix_input_shapes(run.fp32, run.shapes), fix_input_shapes(run.int8, run.shapes)


def report_parts(run: Run) -> dict[str, Any]:
    """The report parts every job has the same way: calibration data, the held-out split."""
    return {"holdout": holdout_block(sample_ids(run.holdout), sample_ids(run.calib), len(run.samples))}


def write(run: Run) -> None:
    """The graphs, manifest and report → the bundle folder (atomically; see :mod:`edgequant.bundle.core`)."""
    int8_bytes = run.int8.SerializeToString(deterministic=True)
    fp32_bytes = run.fp32.SerializeToString(deterministic=True)
    manifest = build_manifest(run.int8, run.target, run.settings, run.preprocess, reference=True,
                              model_format=run.model_format)
    manifest.update(run.manifest_extra)
    parts = {"sizes": sizes_block(fp32_bytes, int8_bytes), "checked_with": run.checked.to_dict(),
             "timings": {k: round(v, 3) for k, v in run.timings.items()}, **run.parts}
    report = new_report(source=run.settings.get("source", "ptq"), target=run.target.name, method=run.method,
                        **parts)
    files = {"model.onnx": int8_bytes, "model.fp32.onnx": fp32_bytes}
    if report.get("layers") is not None:
        from ..bundle.render import report_pages

        files.update(report_pages(report))
    files.update(run.files)
    add_selftest(files, manifest, run.int8, run.holdout if run.selftest_samples is None else run.selftest_samples,
                 level=run.checked.level)
    run.bundle = write_bundle(run.config.out, files, manifest, report, force=run.config.force)
