"""The QAT job's own stages: a prepared (trained) module, or a float model and a ``save_checkpoint`` file →
the QDQ graph that carries the learned scales → checked against fp32 and against the QAT model in PyTorch.
From the QDQ graph on, QAT runs the shared stages (check, kernels, bundle). The order is in
:mod:`edgequant.jobs`."""

from __future__ import annotations

import logging

import numpy as np

from ..data.samples import load_samples
from ..errors import ExportError, UsageError, option
from ..frontend.torch_export import input_names_of, load_model
from ..graph.sessions import checked_with
from ..qat import load_checkpoint, unwrap
from ..qat.convert import agreement as qat_agreement
from ..qat.convert import qdq_graphs
from ..qat.convert import settings as qat_settings
from ..targets import load_target
from .stages import Run

__all__ = ["agreement", "convert", "load", "settings"]

log = logging.getLogger(__name__)


def load(run: Run) -> None:
    """The prepared module (``config.model``), or the float model and its QAT checkpoint → the module, its QAT
    state and target; every sample of the data checks the result. A ``--target`` other than the checkpoint's
    is refused: the scales were learned for that target's integer grid."""
    import torch

    cfg = run.config
    samples = load_samples(cfg.data, preprocess=cfg.data_options.preprocess)
    if cfg.qat.checkpoint is not None:
        loaded = load_model(cfg.model)
        if not isinstance(loaded, torch.nn.Module):
            raise ExportError(f"--qat-checkpoint needs the PyTorch model it was trained from (file.py:factory), not "
                              f"{cfg.model}")
        bound = samples.bind(input_names_of(loaded))
        example = tuple(torch.from_numpy(np.ascontiguousarray(v[None])) for v in bound[0].values())
        qmodel = load_checkpoint(loaded, example, cfg.qat.checkpoint)
    else:
        qmodel = cfg.model
    gm, state = unwrap(qmodel, "qat.export")
    asked = load_target(cfg.target.target).name if cfg.target.target is not None else None
    if asked is not None and asked != state.target.name:
        raise UsageError(f"{option('target', asked)} does not match the QAT checkpoint's target {state.target.name}: "
                         f"its scales were trained for that target; drop {option('target')} or train for {asked}")
    run.loaded = (gm, state)
    run.target, run.opset = state.target, state.target.opset
    run.checked = checked_with(state.target)
    run.samples = run.calib = run.holdout = samples.bind(input_names_of(gm))
    run.preprocess = run.samples.preprocess
    run.selftest_samples = run.samples[len(run.samples) - min(len(run.samples), 16):]  # golden.npz: the last 16


def convert(run: Run) -> None:
    """The module → (fp32 graph, int8 QDQ graph) from one export; float layers on this CPU are logged."""
    from ..check.fidelity import cpu_kernels

    gm, state = run.loaded
    run.fp32, run.int8 = qdq_graphs(gm, state, run.samples)
    if run.target.runtime.cpu_int8_fusion:
        found = cpu_kernels(run.int8)
        if found.float_compute:
            log.warning("these run in float on this machine's CPU provider: %s", ", ".join(found.float_compute[:8]))


def agreement(run: Run) -> None:
    """The int8 graph on ONNX Runtime against the QAT module in PyTorch, per output."""
    gm, state = run.loaded
    agree = qat_agreement(gm, run.int8, run.samples, run.batch_size, run.config.progress, run.checked.level)
    run.parts["qat"] = {**qat_settings(gm, state), "agreement": agree}


# The target's rewrites for its int8 kernels that PTQ applies (jobs/ptq.py) and the QAT export does not: the
# channel padding changes the graph the scales were trained on, and the HardSigmoid-as-Add replaces a trained
# output scale. The manifest records each as off ("what was done"); the report says they were not applied.
NOT_APPLIED = {"depthwise_channel_align": 0, "input_channel_align": 0, "int8_hardsigmoid": False,
               "softmax_inner_axis": False, "float_where_faster": False}


def settings(run: Run) -> None:
    """The manifest's quantization settings (what this export did, not all the target asks for) and the
    report's calibration and held-out parts."""
    gm, state = run.loaded
    qs = qat_settings(gm, state)
    run.method = "qat"
    wanted = run.target.to_dict()["quantization"]
    run.settings = {"source": "qat", "method": "qat", **qs, **wanted, **NOT_APPLIED}
    skipped = [k for k, off in NOT_APPLIED.items() if wanted.get(k) != off]
    if skipped:
        run.parts["qat"]["target_rewrites_not_applied"] = skipped
        log.info("QAT export: the target's %s are not applied (PTQ applies them)", ", ".join(skipped))
    run.parts["calibration"] = {"data": run.samples.source, "samples": len(run.samples),
                                "tensors": qs["activation_quantizers"], "float_tensors": []}
    run.parts["holdout"] = {"samples": len(run.samples), "disjoint_from_calibration": False}
