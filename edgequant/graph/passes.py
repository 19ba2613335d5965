"""Every graph rewrite of the PTQ job, in pipeline order, as an onnx-ir pass that checks itself.

A rewrite is a :class:`GraphPass`, an ``onnx_ir.passes.FunctionalPass`` (the input model is never changed):

- ``applies(model)`` is its precondition (``requires`` raises ``PreconditionError`` where it does not hold);
- ``apply(model)`` is the edit → a :class:`Rewritten` (``PassResult(model, modified)`` + what it changed, for
  the report); ``ensures`` checks that the graph's inputs and outputs kept their names;
- :meth:`PassRun.run` verifies the edit's own effect on a few calibration samples (``VERIFY_SAMPLES``; one
  session per pass that changed the graph, none for a pass that did nothing) against its :class:`Promise`:
  a function-preserving pass must give every float output within ``tolerance`` · max|output| of the graph
  before it; an accuracy-trading pass reports its SQNR change against the fp32 reference and may lose at most
  ``max_loss_db``.

A pass that breaks its promise, raises, or yields a graph ONNX Runtime refuses is undone (the graph before it
is kept), logged, and named with the reason in its :class:`PassRecord` (the report's ``passes`` part). Passes run
in the order of :data:`REGISTRY`, whatever order a stage lists them in:

====================  =====  ========================================================  =====================
pass                  stage  what                                                      promise
====================  =====  ========================================================  =====================
global-average-pool   fp32   spatial ReduceMean → GlobalAveragePool (graph/rewrite.py)  exact
softmax-inner-axis    fp32   Transpose → outer-axis Softmax → Softmax → Transpose       exact
equalize              fp32   cross-layer equalization (transforms/equalize.py)          exact
smooth-quant          fp32   SmoothQuant: MatMul input outliers into weights            exact
pad-depthwise         fp32   depthwise channels padded to the target's kernels          exact
pad-input             fp32   input channels padded (and spread) for dense kernels       exact
hardsigmoid-add       int8   HardSigmoid as an int8 Add (quantize/hardsigmoid.py)       SQNR loss ≤ 3 dB
bias-correction       int8   int32 biases cancel the mean output shift                  SQNR loss ≤ 0.5 dB
====================  =====  ========================================================  =====================
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult, PostconditionError, PreconditionError

from ..errors import EdgeQuantError
from .sessions import batches, input_dtypes, session

__all__ = ["REGISTRY", "VERIFY_SAMPLES", "BiasCorrection", "Equalize", "GlobalAveragePool", "GraphPass",
           "HardSigmoidAdd", "PadDepthwise", "PadInput", "PassRecord", "PassRun", "Promise", "Rewritten",
           "SmoothQuant", "SoftmaxInnerAxis"]

log = logging.getLogger(__name__)

VERIFY_SAMPLES = 8  # calibration samples each pass is verified on


@dataclasses.dataclass(frozen=True)
class Promise:
    """What a pass promises: ``exact`` (same function, every float output within ``tolerance`` · max|output|),
    else a change of accuracy that loses at most ``max_loss_db`` of SQNR against the fp32 reference."""

    exact: bool = True
    tolerance: float = 1e-4
    max_loss_db: float = 0.5

    def describe(self) -> str:
        return f"exact to {self.tolerance:g} of max|output|" if self.exact else \
            f"SQNR loss at most {self.max_loss_db:g} dB"


@dataclasses.dataclass
class Rewritten(PassResult):
    """onnx-ir's PassResult + ``detail``, what the pass changed (the report's ``algorithms`` entry)."""

    detail: Any = None


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One pass on one export: ``outcome`` is kept | undone | no change | not applicable; ``measured`` the
    verification figures; ``reason`` why it was undone."""

    name: str
    stage: str
    promise: str
    outcome: str
    measured: dict = dataclasses.field(default_factory=dict)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class GraphPass(FunctionalPass):
    """A rewrite: ``applies`` (precondition), ``apply`` (the edit, on a model it may not change) and its
    :class:`Promise`, verified by :class:`PassRun`."""

    name: ClassVar[str]
    stage: ClassVar[str] = "fp32"
    promise: ClassVar[Promise] = Promise()

    def applies(self, model: ir.Model) -> bool:
        """Whether the graph has anything this pass rewrites (cheap: no sessions)."""
        raise NotImplementedError

    def apply(self, model: ir.Model) -> Rewritten:
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        if not self.applies(model):
            raise PreconditionError(f"{self.name}: nothing in the graph to rewrite")

    def call(self, model: ir.Model) -> Rewritten:
        return self.apply(model)

    def ensures(self, model: ir.Model) -> None:
        for what, values in (("inputs", model.graph.inputs), ("outputs", model.graph.outputs)):
            if [v.name for v in values] != self._names[what]:
                raise PostconditionError(f"{self.name} changed the graph's {what}")

    def __call__(self, model: ir.Model, /) -> PassResult:
        self._names = {"inputs": [v.name for v in model.graph.inputs],
                       "outputs": [v.name for v in model.graph.outputs]}
        return super().__call__(model)


def _via_proto(model: ir.Model, edit) -> Rewritten:
    """A ModelProto rewrite ``edit(proto) → (new proto, detail)`` as an ir pass result (modified: detail)."""
    out, detail = edit(ir.serde.serialize_model(model))
    return Rewritten(ir.serde.deserialize_model(out), bool(detail), detail)


class GlobalAveragePool(GraphPass):
    name = "global-average-pool"

    def applies(self, model: ir.Model) -> bool:
        from .rewrite import spatial_reduce_means

        return bool(spatial_reduce_means(model.graph))

    def apply(self, model: ir.Model) -> Rewritten:
        from .rewrite import drop_unused_initializers, global_average_pool

        out = model.clone()
        n = global_average_pool(out)
        if n:
            drop_unused_initializers(out.graph)
        return Rewritten(out, bool(n), n)


class SoftmaxInnerAxis(GraphPass):
    name = "softmax-inner-axis"

    def applies(self, model: ir.Model) -> bool:
        from .rewrite import outer_axis_softmaxes

        return bool(outer_axis_softmaxes(model))

    def apply(self, model: ir.Model) -> Rewritten:
        from .rewrite import softmax_inner_axis

        out = model.clone()
        n = softmax_inner_axis(out)
        return Rewritten(out, bool(n), n)


class Equalize(GraphPass):
    name = "equalize"

    def applies(self, model: ir.Model) -> bool:
        from ..transforms.equalize import conv_pairs

        return bool(conv_pairs(model.graph))

    def apply(self, model: ir.Model) -> Rewritten:
        from ..transforms.equalize import equalize_cross_layer

        return _via_proto(model, equalize_cross_layer)


class SmoothQuant(GraphPass):
    name = "smooth-quant"

    def __init__(self, samples: Any, *, alpha: float, batch_size: int, limit: int) -> None:
        self.samples, self.alpha, self.batch_size, self.limit = samples, alpha, batch_size, limit

    def applies(self, model: ir.Model) -> bool:
        return any(n.op_type == "MatMul" and len(n.inputs) > 1 and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None for n in model.graph)

    def apply(self, model: ir.Model) -> Rewritten:
        from ..transforms.algorithms import smooth_quant

        return _via_proto(model, lambda m: smooth_quant(m, self.samples, alpha=self.alpha,
                                                        batch_size=self.batch_size, limit=self.limit))


class PadDepthwise(GraphPass):
    name = "pad-depthwise"

    def __init__(self, align: int) -> None:
        self.align = align

    def applies(self, model: ir.Model) -> bool:
        for n in model.graph:
            w = n.inputs[1] if n.op_type == "Conv" and len(n.inputs) > 1 else None
            if self.align > 1 and w is not None and w.const_value is not None and w.shape is not None:
                group = n.attributes["group"].value if "group" in n.attributes else 1
                dims = list(w.shape)
                if group > 1 and len(dims) >= 3 and dims[1] == 1 and dims[0] == group and group % self.align:
                    return True
        return False

    def apply(self, model: ir.Model) -> Rewritten:
        from ..transforms.channel_pad import pad_depthwise_channels

        return _via_proto(model, lambda m: pad_depthwise_channels(m, self.align))


class PadInput(GraphPass):
    name = "pad-input"

    def __init__(self, align: int, *, spread: bool) -> None:
        self.align, self.spread = align, spread

    def applies(self, model: ir.Model) -> bool:
        return self.align > 1 and any(
            v.shape is not None and len(v.shape) == 4 and v.dtype == ir.DataType.FLOAT
            and any(u.node.op_type == "Conv" and u.idx == 0 for u in v.uses()) for v in model.graph.inputs)

    def apply(self, model: ir.Model) -> Rewritten:
        from ..transforms.channel_pad import pad_input_channels

        return _via_proto(model, lambda m: pad_input_channels(m, self.align, spread=self.spread))


class HardSigmoidAdd(GraphPass):
    name = "hardsigmoid-add"
    stage = "int8"
    promise = Promise(exact=False, max_loss_db=3.0)

    def applies(self, model: ir.Model) -> bool:
        return any(n.op_type == "HardSigmoid" and n.inputs[0] is not None and n.inputs[0].producer() is not None
                   and n.inputs[0].producer().op_type == "DequantizeLinear" for n in model.graph)

    def apply(self, model: ir.Model) -> Rewritten:
        from ..quantize.hardsigmoid import int8_hardsigmoid

        def edit(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
            return proto, int8_hardsigmoid(proto)  # in place on a fresh copy

        return _via_proto(model, edit)


class BiasCorrection(GraphPass):
    name = "bias-correction"
    stage = "int8"
    promise = Promise(exact=False, max_loss_db=0.5)

    def __init__(self, fp32: onnx.ModelProto, samples: Any, *, batch_size: int, limit: int) -> None:
        self.fp32, self.samples, self.batch_size, self.limit = fp32, samples, batch_size, limit

    def applies(self, model: ir.Model) -> bool:
        return any(n.op_type in ("Conv", "Gemm") and len(n.inputs) > 2 and n.inputs[2] is not None
                   and n.inputs[2].producer() is not None and n.inputs[2].producer().op_type == "DequantizeLinear"
                   for n in model.graph)

    def apply(self, model: ir.Model) -> Rewritten:
        from ..quantize.bias_correction import correct_bias

        return _via_proto(model, lambda m: correct_bias(self.fp32, m, self.samples, batch_size=self.batch_size,
                                                        limit=self.limit))


REGISTRY: tuple[type[GraphPass], ...] = (GlobalAveragePool, SoftmaxInnerAxis, Equalize, SmoothQuant, PadDepthwise,
                                         PadInput,
                                         HardSigmoidAdd, BiasCorrection)


class PassRun:
    """Runs passes on ModelProtos and verifies each the first time it changes a graph, on a few of ``samples``;
    later graphs (the accuracy budget re-quantizes) get the same decision without a second check.
    ``reference``: the fp32 model accuracy-trading passes are measured against. ``fixed``: the model takes
    batches of exactly ``batch_size``. ``level``: the ONNX Runtime level the graphs are run at. ``on_record``
    gets each :class:`PassRecord` as it is made (they are also in ``records``)."""

    def __init__(self, samples: Any, *, batch_size: int = 16, fixed: bool = False, level: str = "all",
                 reference: onnx.ModelProto | None = None, count: int = VERIFY_SAMPLES,
                 on_record: Callable[[PassRecord], None] | None = None) -> None:
        n = min(len(samples), batch_size * max(1, -(-count // batch_size)) if fixed else count)
        self.samples = [samples[i] for i in range(n)]
        self.batch_size = batch_size if fixed else max(1, min(batch_size, n))
        self.level, self.reference = level, reference
        self.records: list[PassRecord] = []
        self.on_record = on_record
        self._kept: dict[str, bool] = {}
        self._reference_out: dict[str, np.ndarray] | None = None

    def run(self, model: onnx.ModelProto, passes: Sequence[GraphPass]) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """A model + passes → (the model after every pass that kept its promise, {pass name: detail})."""
        order = {cls: k for k, cls in enumerate(REGISTRY)}
        current, proto, before = ir.serde.deserialize_model(model), model, None
        details: dict[str, Any] = {}
        for p in sorted(passes, key=lambda p: order.get(type(p), len(order))):
            first = p.name not in self._kept
            if not first and not self._kept[p.name]:
                continue
            if not p.applies(current):
                if first:
                    self._note(p, "not applicable")
                continue
            try:
                result = p(current)
            except EdgeQuantError:
                raise
            except Exception as exc:  # a rewrite that fails is undone, not the export's end
                self._undo(p, {}, f"the rewrite raised {type(exc).__name__}: {exc}")
                continue
            if not result.modified:
                if first:
                    self._note(p, "no change")
                continue
            after = ir.serde.serialize_model(result.model)
            if first:
                before = before if before is not None else self._outputs(proto)
                measured, reason, after_out = self._verify(p, before, after)
                if reason:
                    self._undo(p, measured, reason)
                    continue
                self._kept[p.name] = True
                self._add(PassRecord(p.name, p.stage, p.promise.describe(), "kept", measured))
                before = after_out
            else:
                before = None
            current, proto = result.model, after
            details[p.name] = getattr(result, "detail", None)
        return proto, details

    def _add(self, record: PassRecord) -> None:
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def _note(self, p: GraphPass, outcome: str) -> None:
        self._add(PassRecord(p.name, p.stage, p.promise.describe(), outcome))

    def _undo(self, p: GraphPass, measured: dict, reason: str) -> None:
        log.warning("rewrite %s undone: %s", p.name, reason)
        self._kept[p.name] = False
        self._add(PassRecord(p.name, p.stage, p.promise.describe(), "undone", measured, reason))

    def _outputs(self, model: onnx.ModelProto, level: str | None = None) -> dict[str, np.ndarray]:
        """{float output name: outputs on the verification samples}, one session."""
        s = session(model, level=level or self.level, arena=False)
        names = [o.name for o in s.get_outputs()]
        got: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for batch in batches(self.samples, self.batch_size, input_dtypes(s)):
            for n, v in zip(names, s.run(names, batch)):
                got[n].append(np.asarray(v))
        return {n: np.concatenate(v) for n, v in got.items() if v and np.issubdtype(v[0].dtype, np.floating)}

    def _verify(self, p: GraphPass, before: dict[str, np.ndarray], after_model: onnx.ModelProto
                ) -> tuple[dict, str | None, dict[str, np.ndarray]]:
        """(measured figures, why the promise is broken or None, the outputs after the pass)."""
        try:
            after = self._outputs(after_model)
        except Exception as exc:  # onnxruntime raises its own types for a graph it refuses
            return {}, f"ONNX Runtime cannot run the rewritten graph ({type(exc).__name__}: {exc})", {}
        names = [n for n in before if n in after]
        broken = [n for n in names if np.isfinite(before[n]).sum() != np.isfinite(after[n]).sum()
                  or before[n].shape != after[n].shape]
        if broken:
            return {}, f"output {broken[0]} changed shape or gained non-finite values", after
        return (self._exact if p.promise.exact else self._trade)(p, before, after, names)

    def _exact(self, p: GraphPass, before, after, names) -> tuple[dict, str | None, dict]:
        """max over float outputs of max|after − before| / max|before| (finite positions)."""
        worst = 0.0
        for n in names:
            ok = np.isfinite(before[n])
            scale = float(np.abs(before[n][ok]).max(initial=0.0)) or 1.0
            worst = max(worst, float(np.abs(before[n][ok].astype(np.float64) - after[n][ok]).max(initial=0.0))
                        / scale)
        measured = {"max_relative_error": float(f"{worst:.3g}")}
        if worst > p.promise.tolerance:
            return measured, (f"outputs moved by {worst:.3g} of their largest value on {len(self.samples)} "
                              f"calibration samples (promise: {p.promise.describe()})"), after
        return measured, None, after

    def _trade(self, p: GraphPass, before, after, names) -> tuple[dict, str | None, dict]:
        from ..check.metrics import sqnr_db

        if self._reference_out is None:
            self._reference_out = self._outputs(self.reference, level="all") if self.reference is not None else {}
        ref = self._reference_out
        drops = [(sqnr_db(ref[n], after[n]) - sqnr_db(ref[n], before[n]), n) for n in names if n in ref]
        if not drops:
            return {}, None, after
        change, n = min(drops)
        measured = {"output": n, "sqnr_before_db": round(sqnr_db(ref[n], before[n]), 3),
                    "sqnr_after_db": round(sqnr_db(ref[n], after[n]), 3), "sqnr_change_db": round(change, 3)}
        if change < -p.promise.max_loss_db:
            return measured, (f"SQNR of {n} fell by {-change:.2f} dB on {len(self.samples)} calibration samples "
                              f"(promise: {p.promise.describe()})"), after
        return measured, None, after

