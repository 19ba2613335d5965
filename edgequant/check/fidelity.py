"""Check the int8 model against the fp32 one: where the int8 kernels are (from ONNX Runtime's own
optimized graph, not a guess) and how closely the outputs agree on held-out samples."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..graph.sessions import batches, input_dtypes, session

__all__ = ["FLOAT_COMPUTE_OPS", "INT8_OPS", "Fidelity", "KernelReport", "cpu_kernels", "compare_outputs",
           "fidelity", "session"]

# ONNX Runtime CPU kernels that compute in 8-bit integers after QDQ fusion.
INT8_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearSoftmax",
    "QLinearLeakyRelu", "QLinearWhere", "QLinearReduceMean", "QLinearConvTranspose", "MatMulInteger",
    "ConvInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM", "MatMulNBits",
})
# Multiply-accumulate ops that, if still present after optimization, run in floating point.
FLOAT_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul",
                               "Attention", "MultiHeadAttention", "Einsum"})


@dataclass
class KernelReport:
    """What ONNX Runtime's CPU provider runs after its graph optimizations."""

    int8: dict[str, int] = field(default_factory=dict)
    float_compute: list[str] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)

    @property
    def int8_nodes(self) -> int:
        return sum(self.int8.values())

    def to_dict(self) -> dict:
        return {"int8": dict(sorted(self.int8.items())), "int8_nodes": self.int8_nodes,
                "float_compute": list(self.float_compute), "other": dict(sorted(self.other.items()))}


def cpu_kernels(model: onnx.ModelProto) -> KernelReport:
    """QDQ model → the op types ONNX Runtime's CPU provider runs after its QDQ fusions (extended level, before
    layout transforms rename the kernels), and the names of multiply-accumulate nodes left in float."""
    with tempfile.TemporaryDirectory(prefix="edgequant-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model, level="extended", optimized_path=path)
        optimized = onnx.load(path)
    report = KernelReport()
    int8, other = Counter(), Counter()
    for node in optimized.graph.node:
        if node.op_type in INT8_OPS:
            int8[node.op_type] += 1
        elif node.op_type in FLOAT_COMPUTE_OPS:
            report.float_compute.append(f"{node.op_type}:{node.name}")
        else:
            other[node.op_type] += 1
    report.int8, report.other = dict(int8), dict(other)
    return report


@dataclass
class Fidelity:
    """Agreement of one output between the fp32 and the int8 model (see ``outputs.py`` for the figures, the
    degenerate cases and the parts of an output that mixes ranges). ``cosine`` is None where it would mean
    nothing (a constant, zero or integer output)."""

    output: str
    samples: int
    cosine: float | None
    max_abs_error: float | None
    mean_abs_error: float | None
    fp32_abs_max: float | None
    argmax_agreement: float | None = None
    status: str = "ok"  # ok | zero | constant | integer
    sqnr_db: float | None = None
    correlation: float | None = None
    parts: list[dict] = field(default_factory=list)
    note: str | None = None
    exact_match: float | None = None
    zero_fp32_samples: int | None = None
    pixel_argmax_agreement: float | None = None  # (N, C, H, W) outputs: share of pixels with the same class
    map: str | None = None  # dense maps (check/layout.py): "probability", "classes" or "values"
    map_iou: float | None = None  # probability maps: IoU of the pixels above map_threshold
    map_threshold: float | None = None

    @classmethod
    def from_result(cls, r: dict) -> Fidelity:
        return cls(**{k: r.get(k) for k in ("output", "samples", "cosine", "max_abs_error", "mean_abs_error",
                                             "fp32_abs_max", "argmax_agreement")},
                   status=r.get("status", "ok"), sqnr_db=r.get("sqnr_db"), correlation=r.get("correlation"),
                   parts=list(r.get("parts", [])), note=r.get("note"), exact_match=r.get("exact_match"),
                   zero_fp32_samples=r.get("zero_fp32_samples"),
                   pixel_argmax_agreement=r.get("pixel_argmax_agreement"),
                   **{k: r.get(k) for k in ("map", "map_iou", "map_threshold")})

    def to_dict(self) -> dict:
        out = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        for k in ("parts", "note", "exact_match", "zero_fp32_samples", "pixel_argmax_agreement"):
            if not out[k]:
                out.pop(k)
        for k in ("map", "map_threshold", "map_iou"):  # a probability map keeps map_iou None: no pixel above
            if out[k] is None and not (k == "map_iou" and out.get("map") == "probability"):
                out.pop(k)
        return out


def compare_outputs(name: str, ref: np.ndarray, test: np.ndarray, *, pieces=None, dense: bool = False) -> Fidelity:
    """Two output batches (N, ...) → their agreement. Argmax agreement only for class-like (N, C>1) outputs;
    parts only along the axis a Concat built (``pieces``, check/layout.py); map figures where ``dense``."""
    from .outputs import OutputAgreement

    acc = OutputAgreement(name, pieces=pieces, dense=dense)
    acc.update(ref, test)
    return Fidelity.from_result(acc.result())


def fidelity(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], *,
             batch_size: int = 16, level: str = "all") -> list[Fidelity]:
    """Both models on the same samples → per-output agreement, folded batch by batch (memory: one batch); the
    int8 model runs at ONNX Runtime ``level`` (the target's arithmetic: see ``edgequant.graph.sessions``)."""
    from .layout import concat_pieces, dense_map
    from .outputs import OutputAgreement

    s_ref, s_q = session(fp32, arena=False), session(int8, level=level, arena=False)
    dtypes = input_dtypes(s_ref)
    names = [o.name for o in s_ref.get_outputs()]
    pieces = concat_pieces(fp32)
    accs: dict[str, OutputAgreement] = {}
    for batch in batches(samples, batch_size, dtypes):
        for n, r, t in zip(names, s_ref.run(names, batch), s_q.run(names, batch)):
            if n not in accs:  # what the output is: from the graph and the first batch's shapes
                dense = r.dtype.kind == "f" and dense_map(r.shape, [v.shape for v in batch.values()])
                accs[n] = OutputAgreement(n, pieces=pieces.get(n), dense=dense)
            accs[n].update(r, t)
        del r, t
    return [Fidelity.from_result(accs.setdefault(n, OutputAgreement(n)).result()) for n in names]

