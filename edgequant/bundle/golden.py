"""The self-test that travels with a bundle: a few held-out inputs from the user's own data and the outputs the
target is expected to compute for them (the int8 model run in the target's arithmetic, as the report's
figures were), in ``golden.npz``. The device adapter's ``--selftest`` runs them and compares, in output
quantization steps (manifest ``selftest``, documented in ``runtimes/README.md``).

One entry per sample (``input.<i>.<name>``, ``output.<i>.<name>``, each with its batch axis of 1), since text
samples differ in length; a model whose batch axis is fixed at B > 1 gets entries of B samples.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from ..graph.index import producers

__all__ = ["GOLDEN", "SAMPLES", "TOLERANCE_STEPS", "add_selftest", "output_steps"]

GOLDEN = "golden.npz"
SAMPLES = 16
# The device may round a requantized value the other way where its fused kernels differ from the exact check
# (VNNI's integer requantization, ARM's u8 kernels for generic-cpu): one output step, never more.
TOLERANCE_STEPS = 1.0


def output_steps(model: onnx.ModelProto) -> dict[str, float]:
    """Graph output → one quantization step: the scale of the per-tensor DequantizeLinear that produces it."""
    inits = {i.name: i for i in model.graph.initializer}
    producer_of = producers(model.graph)
    steps = {}
    for out in model.graph.output:
        node = producer_of.get(out.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            if scale.size == 1:
                steps[out.name] = float(scale.reshape(()))
    return steps


def add_selftest(files: dict[str, bytes], manifest: dict[str, Any], model: onnx.ModelProto,
                 samples: Sequence[dict[str, np.ndarray]], *, level: str, count: int = SAMPLES) -> None:
    """Adds ``golden.npz`` to ``files`` and its ``selftest`` entry to ``manifest``: the first ``count``
    held-out samples through ``model`` at ONNX Runtime ``level`` (the target's arithmetic).

    Outputs that no DequantizeLinear produces (float outputs) get a step of max|output| / 127 over the golden
    samples: one 8-bit step of their range."""
    from ..graph.sessions import batches, input_dtypes, session
    from ..graph.tap import fit_batch

    s = session(model, level=level, threads=1)
    dtypes = input_dtypes(s)
    names = [o.name for o in s.get_outputs()]
    per = fit_batch([s], samples, dtypes, 1)  # 1, or the batch size the model fixes
    n = max(min(count, len(samples)) // per, 1) * per
    if n > len(samples):  # fewer samples than one fixed batch: no self-test can be built
        return
    arrays: dict[str, np.ndarray] = {}
    peak = dict.fromkeys(names, 0.0)
    for i, batch in enumerate(batches([samples[j] for j in range(n)], per, dtypes)):
        for k, v in batch.items():
            arrays[f"input.{i}.{k}"] = v
        for k, v in zip(names, s.run(names, batch)):
            arrays[f"output.{i}.{k}"] = v
            if v.dtype.kind == "f" and v.size:
                peak[k] = max(peak[k], float(np.abs(v).max()))
    steps = output_steps(model)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    files[GOLDEN] = buf.getvalue()
    manifest["selftest"] = {
        "file": GOLDEN, "samples": n, "entries": n // per, "tolerance_steps": TOLERANCE_STEPS,
        "output_steps": {k: steps.get(k, (peak[k] / 127.0) or 1.0) for k in names},
        "step_source": {k: "output DequantizeLinear scale" if k in steps else "max|output| / 127" for k in names},
        "expected_with": {"onnxruntime_level": level},
    }
