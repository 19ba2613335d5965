"""The activation tap: fp32 model + samples + tensor names → per batch, the values of those tensors.

Calibration (min/max and histograms), GPTQ's Hessians and SmoothQuant's channel ranges all need the same
thing: some internal tensors of the model, batch by batch, in one streaming pass, with a clear error where the
fp32 model overflows. The tensors become extra graph outputs of one ONNX Runtime session (basic optimization
level, so no fusion hides them); memory is one batch of activations, whatever the number of samples.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..errors import CalibrationError
from .sessions import batch_axes_of, batch_step, batches, input_dtypes, session

__all__ = ["ACTIVATION_BUDGET", "fit_batch", "tap", "with_outputs"]

# Bytes of exposed activations one batch may hold: passes that expose many activations (the tap, the per-layer
# report) shrink their batch to this, so that peak memory is one such batch whatever the input size (YOLOv8n at
# 640×640 exposes ~0.4 GB per image).
ACTIVATION_BUDGET = 512 * 2**20


def fit_batch(sessions: Sequence, samples: Sequence[dict[str, np.ndarray]], dtypes: dict[str, np.dtype],
              batch_size: int, budget: int = ACTIVATION_BUDGET) -> int:
    """Sessions that expose activations + samples → the largest batch (at most ``batch_size``) whose outputs
    fit ``budget`` bytes, measured on one sample; a model with a fixed batch keeps it."""
    if not len(samples):
        return batch_size
    axes = batch_axes_of(samples)
    fixed = {i.shape[a] for s in sessions for i in s.get_inputs()
             if (a := axes.get(i.name, 0)) is not None and len(i.shape or ()) > a and isinstance(i.shape[a], int)}
    if fixed:
        return max(fixed)
    one = next(batches([samples[0]], 1, dtypes))
    per = sum(v.nbytes for s in sessions for v in _run(s, [o.name for o in s.get_outputs()], one))
    return int(max(1, min(batch_size, budget // max(per, 1))))


def _data_failed(exc: Exception) -> CalibrationError:
    """ONNX Runtime's failure on the user's data (it names the node) → one line."""
    line = next((s for s in str(exc).splitlines() if s.strip()), type(exc).__name__)
    return CalibrationError(f"ONNX Runtime failed on the calibration data: {line[:300]}; check that the data fits "
                            "the model's inputs")


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` added to the graph outputs (those already outputs are not repeated)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return out


def _low_memory_session(model: onnx.ModelProto, names: Sequence[str]):
    """The tap's session without a second in-memory copy of the weights: serialized protobuf messages merge when
    concatenated (repeated fields append), so the outputs are appended to the serialized model in a file, and
    ONNX Runtime does not pre-pack the weights (one pass does not pay for it)."""
    existing = {o.name for o in model.graph.output}
    extra = onnx.ModelProto()
    extra.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    with tempfile.TemporaryDirectory(prefix="edgequant-") as tmp:
        path = os.path.join(tmp, "augmented.onnx")
        with open(path, "wb") as fh:
            fh.write(model.SerializeToString())
            fh.write(extra.SerializeToString())
        return session(path, level="basic", prepacking=False, arena=False)


def tap(model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], tensors: Sequence[str], *,
        batch_size: int = 16, progress: Callable[[int], None] | None = None, mask_input: str | None = None,
        low_memory: bool = False) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """fp32 model + samples + tensor names → per batch, (the batch, {tensor: value}). A NaN, or an infinity that
    reaches a graph output, is a CalibrationError naming the tensor; ``progress(n)`` is called after each batch of
    n samples.

    With ``mask_input`` (a 0/1 attention mask input, sequence on axis 1), each batch is cut after its longest
    sequence: the positions cut are padding, which attention and pooling ignore, so their activations need no
    range. ``low_memory`` opens the session without a second copy of the weights (large transformers)."""
    names = list(tensors)
    outputs = [o.name for o in model.graph.output]
    sess = _low_memory_session(model, names) if low_memory else session(with_outputs(model, names), level="basic",
                                                                        arena=False)
    dtypes = input_dtypes(sess)
    batch_size = fit_batch([sess], samples, dtypes, batch_size)
    step = batch_step(samples, batch_size)
    for start, batch in zip(range(0, len(samples), step), batches(samples, batch_size, dtypes)):
        if mask_input is not None and mask_input in batch:
            used = int(np.max(np.nonzero(batch[mask_input].any(axis=0))[0], initial=0)) + 1
            batch = {k: v[:, :used] if v.ndim >= 2 else v for k, v in batch.items()}
        values = _run(sess, names, batch)
        if not all(_finite(name, value, outputs) for name, value in zip(names, values)):
            # an infinity inside the graph (an attention mask's -inf) is an overflow only where it reaches the
            # outputs: this batch runs once more for them
            for name, value in zip(outputs, _run(sess, outputs, batch)):
                _finite(name, value, outputs)
        out = dict(zip(names, values))
        del values
        yield batch, out
        del out  # before the next batch is computed: one batch alive, not two
        if progress:
            progress(min(step, len(samples) - start))


def _run(sess, names: Sequence[str], batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One batch through the session; ONNX Runtime's failure on the user's data → one line."""
    try:
        return sess.run(list(names), batch)
    except Exception as exc:  # onnxruntime raises its own assorted types
        raise _data_failed(exc) from None


def _finite(name: str, value: np.ndarray, outputs: Sequence[str]) -> bool:
    """True if ``value`` has no NaN/Inf. A NaN anywhere, or an infinity in a graph output, is an fp32 overflow →
    CalibrationError; an infinity elsewhere returns False (attention masks add -inf by design before a Softmax:
    such a tensor has no finite range, and quantize.qdq keeps it float)."""
    if value.dtype.kind != "f" or np.isfinite(value).all():
        return True
    if name in outputs or np.isnan(value).any():
        raise CalibrationError(f"tensor {name!r} has NaN/Inf on the calibration data: the fp32 model "
                               "overflows there; check the model and the data's pre-processing")
    return False
