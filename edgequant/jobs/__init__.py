"""The jobs, each one list of stages run in order on one :class:`~edgequant.jobs.stages.Run`.

    load → fp32 ONNX → fp32 passes → calibrate → quantize → budget → check → bundle

A stage is a small function with one job (``stage(run) -> None``), testable alone; shared stages live in
:mod:`.stages`, a job's own in its module (:mod:`.ptq`, :mod:`.text`, :mod:`.weight_only`, :mod:`.qat`). Jobs
never import each other. :func:`export` is the front door: options → a validated :class:`ExportConfig` → the
job it selects.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..bundle.core import Bundle
from ..config import ExportConfig
from . import choices, decoder, ptq, qat, stages, text, weight_only

__all__ = ["PIPELINES", "export", "run_job"]

log = logging.getLogger(__name__)

PIPELINES: dict[str, tuple[stages.Stage, ...]] = {
    # post-training quantization of a PyTorch or ONNX model (the main job)
    "ptq": (stages.load, ptq.fp32_graph, choices.kernel_choices, ptq.fp32_passes, ptq.calibrate, ptq.heads,
            ptq.quantize, ptq.budget, stages.check, ptq.detection, ptq.host_kernels, ptq.layers, ptq.gate,
            stages.fixed_shapes, stages.kernels, ptq.settings, stages.write),
    # Hugging Face text encoders: tokenized text, smoothed MatMul inputs (or dynamic, or weight-only)
    "text": (text.load, text.quantize, text.check, stages.kernels, text.settings, stages.write),
    # block-quantized MatMul weights, activations in float
    "weight-only": (stages.load, weight_only.fp32_graph, weight_only.quantize, stages.check, stages.fixed_shapes,
                    weight_only.settings, stages.write),
    # decoder-only language models: weight-only, checked by generating text (one stage for now: export_decoder)
    "decoder": (decoder.export_stage,),
    # quantization-aware training: the QDQ graph carries the trained scales
    "qat": (qat.load, qat.convert, stages.kernels, stages.check, qat.agreement, qat.settings, stages.write),
}


def run_job(config: ExportConfig, job: str | None = None) -> Bundle:
    """A config → its job's stages, in order, timed (the report's ``timings``: seconds per stage) → the bundle."""
    config.validate()
    job = job or config.job
    run = stages.open_run(config)
    for stage in PIPELINES[job]:
        if stage is stages.write:
            run.timings["total_s"] = time.perf_counter() - run.t0
        t = time.perf_counter()
        stage(run)
        run.timings[f"{stage.__name__}_s"] = time.perf_counter() - t
        log.debug("%s: %s done in %.3f s", job, stage.__name__, run.timings[f"{stage.__name__}_s"])
    return run.bundle


def export(model: Any, calibration: Any, *, out: str | Path, **options: Any) -> Bundle:
    """A model (``file.py:factory``, ``module:factory``, ``.onnx``, an ``nn.Module`` or a Hugging Face model
    folder) and calibration data (a folder, a .npy/.npz file, an iterable of arrays/dicts, or text) → an int8
    bundle written to ``out``. The options are the fields of :class:`edgequant.config.ExportConfig` (see
    docs/options.md); one the selected job does not take is a UsageError."""
    return run_job(ExportConfig.from_options(model, calibration, out=out, **options))
