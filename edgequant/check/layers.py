"""Per-layer error: fp32 model + its int8 QDQ model + held-out samples → for every quantized activation tensor,
how far its int8 value is from the fp32 one, both accumulated and added by its own layer.

A row per tensor T that a QuantizeLinear node reads (activations; weights are stored already quantized):

- **accumulated**: the full int8 model's T (dequantized) against fp32 T, so the error of everything up to T;
- **alone**: only the layer that produces T is quantized (its int8 weights and the QDQ pair on T, fed with the
  fp32 values of its inputs) against fp32 T, so the error that layer adds on its own. For a graph input,
  QDQ(x) against x. Each QDQ pair belongs to exactly one row, so a badly chosen range shows up on the row of the
  tensor it quantizes, not on the layers downstream of it.

Every integer tensor is read back in the scale its consumers read it in: the scale and zero point of the
DequantizeLinear nodes after the QuantizeLinear, not the QuantizeLinear's own. They are the same in an ordinary
QDQ pair; a rewritten node can differ (a HardSigmoid run as an int8 Add, edgequant.quantize.hardsigmoid,
quantizes x + β/α at (1/α)/255 and is read back at 1/255, i.e. times α), and then only the consumers' scale
compares it like for like with the fp32 tensor.

With x the fp32 values and x̂ the int8 ones, summed over all elements of all held-out samples:
SQNR = 10·log10(Σx² / Σ(x − x̂)²) dB (capped at ``MAX_SQNR_DB`` when there is no error), MSE = Σ(x − x̂)² / n.

Why not ``onnxruntime.quantization.qdq_loss_debug``: it keeps every activation of every sample in Python lists
before comparing (memory grows with the data) and writes augmented models to files. Here two sessions run
batch by batch and fold each batch into running sums, so memory is one batch of activations:

- the int8 model with each QuantizeLinear output (integers) exposed and dequantized in numpy. ONNX Runtime's
  QDQ fusion only requires that the DequantizeLinear outputs stay internal, so the exposed graph runs the same
  int8 kernels and the values are those the device computes;
- the fp32 model with, for every row, a quantized copy of the producing layer attached as a side branch reading
  fp32 tensors: all layers "alone" in one pass instead of one model per layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from ..graph.sessions import batches, input_dtypes, session
from ..graph.index import consumers, producers
from ..graph.tap import fit_batch, with_outputs
from .metrics import MAX_SQNR_DB, sqnr_from_sums

__all__ = ["MAX_SQNR_DB", "LayerError", "LayerRow", "format_layers", "layer_errors"]

log = logging.getLogger(__name__)

MAX_SAMPLES = 32  # held-out samples the per-layer table runs on: a diagnostic, not the check
_PREFIX = "edgequant.alone/"


@dataclass(frozen=True)
class LayerRow:
    """Error of one quantized tensor on the held-out samples (see the module docstring for the two kinds)."""

    tensor: str
    node: str  # ONNX node that produces the tensor ("" for a graph input)
    op_type: str
    module: str  # PyTorch module scope of that node, from the exporter's metadata ("" where unknown)
    index: int  # position of the tensor's QuantizeLinear in the int8 graph (graph order)
    accumulated_sqnr_db: float
    accumulated_mse: float
    accumulated_max_abs_error: float
    alone_sqnr_db: float
    alone_mse: float
    fp32_rms: float

    def to_dict(self) -> dict:
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in asdict(self).items()}


LayerError = LayerRow  # the row's former name (it is a data row, not an exception); kept for old imports


@dataclass(frozen=True)
class _Row:
    q_node: str
    fp32_name: str  # the tensor in the fp32 graph
    q_output: str  # integer output of the QuantizeLinear in the int8 graph
    scale: np.ndarray  # the scale and zero point the consumers read the integers in (see the module docstring)
    zero_point: np.ndarray
    producer: onnx.NodeProto | None  # int8 node that writes the QuantizeLinear's input
    quantize: onnx.NodeProto  # the QuantizeLinear itself
    read: tuple[str, str]  # the initializers of that scale and zero point


def layer_errors(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], *,
                 batch_size: int = 16, progress: Callable[[int], None] | None = None,
                 level: str = "all") -> list[LayerRow]:
    """fp32 model + its QDQ int8 model + held-out samples → per-tensor errors, worst "alone" SQNR first. The
    int8 graphs run at ONNX Runtime ``level``, the same arithmetic as the output fidelity."""
    rows = _rows(fp32, int8)
    if not rows:
        return []
    acc_model = with_outputs(int8, [r.q_output for r in rows])
    graph_inputs = {i.name for i in fp32.graph.input}
    ref_names = sorted({r.fp32_name for r in rows if r.fp32_name not in graph_inputs})
    alone_model, alone_out = _alone_model(fp32, int8, rows, ref_names)
    s_acc = session(acc_model, level=level, arena=False)
    s_alone = session(alone_model, level=level, arena=False)
    dtypes = input_dtypes(s_alone)
    alone_names = [alone_out[r.q_node] for r in rows]
    sums = np.zeros((len(rows), 4))  # Σx², Σ(x - x̂acc)², Σ(x - x̂alone)², n
    max_abs = np.zeros(len(rows))
    samples = samples[:MAX_SAMPLES] if isinstance(samples, list) else [samples[i] for i in
                                                                        range(min(len(samples), MAX_SAMPLES))]
    batch_size = fit_batch([s_acc, s_alone], samples, dtypes, batch_size)
    for batch in batches(samples, batch_size, dtypes):
        quantized = s_acc.run([r.q_output for r in rows], batch)
        outs = s_alone.run(ref_names + alone_names, batch)
        refs = {**dict(zip(ref_names, outs[:len(ref_names)])), **batch}
        for i, (r, q, alone) in enumerate(zip(rows, quantized, outs[len(ref_names):])):
            # float32 arrays, float64 sums: dot products instead of float64 copies of every activation
            x = refs[r.fp32_name].astype(np.float32, copy=False).ravel()
            acc = q.astype(np.float32).ravel()
            acc -= np.float32(r.zero_point.item())
            acc *= np.float32(r.scale.item())
            np.subtract(x, acc, out=acc)
            d_alone = x - alone.astype(np.float32, copy=False).ravel()
            sums[i] += (_dot(x), _dot(acc), _dot(d_alone), x.size)
            if acc.size:
                max_abs[i] = max(max_abs[i], float(acc.max()), -float(acc.min()))
        del quantized, outs, refs, x, acc, d_alone  # before the next batch is computed: one batch alive, not two
        if progress:
            progress(len(next(iter(batch.values()))))
    meta = _scopes(int8)
    out = []
    for i, r in enumerate(rows):
        sig, e_acc, e_alone, n = sums[i]
        p = r.producer
        out.append(LayerRow(
            tensor=r.fp32_name, node=p.name if p is not None else "", op_type=p.op_type if p is not None else "input",
            module=meta.get(p.name, "") if p is not None else "", index=i,
            accumulated_sqnr_db=sqnr_from_sums(sig, e_acc), accumulated_mse=e_acc / max(n, 1),
            accumulated_max_abs_error=float(max_abs[i]), alone_sqnr_db=sqnr_from_sums(sig, e_alone),
            alone_mse=e_alone / max(n, 1), fp32_rms=math.sqrt(sig / max(n, 1))))
    return sorted(out, key=lambda e: (e.alone_sqnr_db, e.index))


def _dot(v: np.ndarray) -> float:
    """Σv² of a float32 vector, accumulated in float64 by chunks (a float32 dot over millions of values loses
    digits)."""
    total = 0.0
    for start in range(0, v.size, 1 << 16):
        c = v[start:start + (1 << 16)]
        total += float(np.dot(c, c))
    return total


def _rows(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> list[_Row]:
    """One row per QuantizeLinear of an activation, in graph order, with its fp32 counterpart's name."""
    inits = {i.name: i for i in int8.graph.initializer}
    fp32_names = _tensor_names(fp32)
    producer = producers(int8.graph)
    users = consumers(int8.graph)
    rows = []
    for node in int8.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        if node.input[1] not in inits or node.input[2] not in inits:
            continue
        name = node.input[0]
        if name not in fp32_names:
            # The quantizer renames a graph output's producer (T → T_QuantizeLinear_Input); the fp32 tensor is
            # the name its DequantizeLinear restores.
            dq = [c.output[0] for c in users.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
            name = next((d for d in dq if d in fp32_names), None)
            if name is None:
                log.debug("no fp32 counterpart for %s; left out of the layer report", node.input[0])
                continue
        read = _read_scale(node, users.get(node.output[0], []), inits)
        scale = numpy_helper.to_array(inits[read[0]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[read[1]]).astype(np.float64)
        if scale.size != 1:
            continue  # per-channel activations: not produced by our targets
        rows.append(_Row(node.name, name, node.output[0], scale, zp, producer.get(node.input[0]), node, read))
    return rows


def _read_scale(q: onnx.NodeProto, readers: Sequence[onnx.NodeProto], inits) -> tuple[str, str]:
    """A QuantizeLinear and the nodes reading its integers → the (scale, zero point) initializers they are read
    back with: the DequantizeLinears' when they all agree, else the QuantizeLinear's own."""
    pairs = {(r.input[1], r.input[2]) for r in readers if r.op_type == "DequantizeLinear" and len(r.input) >= 3}
    if len(pairs) == 1:
        pair = next(iter(pairs))
        if all(p in inits for p in pair):
            return pair
    return q.input[1], q.input[2]


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {v.name for v in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}


def _alone_model(fp32: onnx.ModelProto, int8: onnx.ModelProto, rows: Sequence[_Row], refs: Sequence[str]):
    """fp32 model + one side branch per row (its quantized producer reading fp32 tensors, then the row's QDQ)
    + the fp32 tensors ``refs`` as outputs → (model, {QuantizeLinear name: side-branch output}). Built on onnx_ir: branches are new nodes wired to
    the fp32 graph's values and to copies of the int8 graph's quantized weights; no fp32 node is touched."""
    model = ir.serde.deserialize_model(fp32)
    g = model.graph
    src = ir.serde.deserialize_model(int8).graph
    values: dict[str, ir.Value] = {v.name: v for v in (*g.inputs, *g.initializers.values())}
    values.update({v.name: v for node in g for v in node.outputs})
    copied: dict[str, ir.Value] = {}

    def const(v: ir.Value) -> ir.Value:
        """An int8-graph initializer (quantized weight, scale, zero point) → its copy in the new graph."""
        if v.name not in copied:
            name = f"{_PREFIX}{v.name}"
            # a new tensor, not the int8 model's: serializing renames the tensor it writes
            tensor = ir.Tensor(v.const_value.numpy(), name=name)
            c = ir.Value(name=name, shape=v.shape, type=v.type, const_value=tensor)
            g.register_initializer(c)
            copied[v.name] = c
        return copied[v.name]

    def fp32_value(v: ir.Value) -> ir.Value | None:
        """An activation the int8 node reads → the fp32 value it stands for (through DequantizeLinear ← Q)."""
        node = v.producer()
        if node is not None and node.op_type == "DequantizeLinear":
            q = node.inputs[0].producer()
            if q is not None and q.op_type == "QuantizeLinear":
                return fp32_value(q.inputs[0])
        return values.get(v.name)

    def copy(node: ir.Node, name: str, inputs: Sequence[ir.Value | None]) -> ir.Node:
        new = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                      num_outputs=len(node.outputs), version=node.version, name=name)
        for i, out in enumerate(new.outputs):
            out.name = f"{name}/{i}"
        g.append(new)
        return new

    q_nodes = {n.name: n for n in src if n.op_type == "QuantizeLinear"}
    src_inits = src.initializers
    outputs: dict[str, str] = {}
    for k, row in enumerate(rows):
        pre = f"{_PREFIX}{k}/"
        q = q_nodes[row.q_node]
        x = values.get(row.fp32_name)
        p = q.inputs[0].producer()
        if p is not None and not _has_subgraph(p):
            inputs = [_branch_input(v, pre, j, const, fp32_value, copy) for j, v in enumerate(p.inputs)]
            if all(v is not None for v, orig in zip(inputs, p.inputs) if orig is not None):
                x = copy(p, pre + "layer", inputs).outputs[q.inputs[0].index() or 0]
        qq = copy(q, pre + "q", [x, *(const(v) for v in q.inputs[1:])])
        dq = ir.Node("", "DequantizeLinear", [qq.outputs[0], *(const(src_inits[n]) for n in row.read)],
                     name=pre + "dq",
                     attributes=[a for a in q.attributes.values() if a.name == "axis"])
        dq.outputs[0].name = pre + "out"
        g.append(dq)
        g.outputs.append(dq.outputs[0])
        outputs[row.q_node] = pre + "out"
    exposed = {id(v) for v in g.outputs}
    g.outputs.extend(values[n] for n in refs if id(values[n]) not in exposed)
    for domain, version in src.opset_imports.items():
        model.opset_imports[domain] = max(version, model.opset_imports.get(domain, version))
    return ir.serde.serialize_model(model), outputs


def _branch_input(v, pre, j, const, fp32_value, copy):
    """One input of a layer's int8 copy: its own quantized weight (DequantizeLinear of an initializer, copied),
    else the fp32 value the int8 activation stands for, else a copied int8 constant."""
    if v is None:
        return None
    node = v.producer()
    if node is not None and node.op_type == "DequantizeLinear" and node.inputs[0].is_initializer():
        return copy(node, f"{pre}w{j}", [const(i) if i is not None else None for i in node.inputs]).outputs[0]
    found = fp32_value(v)
    if found is not None:
        return found
    return const(v) if v.is_initializer() else None


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _scopes(model: onnx.ModelProto) -> dict[str, str]:
    """Node name → the innermost PyTorch module it came from (``pkg.torch.onnx.name_scopes`` metadata)."""
    import ast

    out = {}
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key != "pkg.torch.onnx.name_scopes":
                continue
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                continue
            mods = [s for s in scopes[:-1] if s] if isinstance(scopes, list) else []
            out[n.name] = mods[-1] if mods else ""
    return out


def format_layers(rows: Sequence[dict], *, limit: int | None = None) -> str:
    """Layer rows (``LayerRow.to_dict()``, as in report.json) → a terminal table, worst "alone" first."""
    if not rows:
        return "layers   no quantized activations"
    head = f"{'#':>3}  {'tensor':<24} {'node':<22} {'module':<18} {'alone dB':>9} {'accum dB':>9} {'accum MSE':>10}"
    lines = [head, "-" * len(head)]
    shown = list(rows)[:limit] if limit else list(rows)
    for r in shown:
        lines.append(f"{r['index']:>3}  {_cut(r['tensor'], 24):<24} {_cut(r['node'] or '(input)', 22):<22} "
                     f"{_cut(r['module'] or '-', 18):<18} {r['alone_sqnr_db']:>9.2f} {r['accumulated_sqnr_db']:>9.2f} "
                     f"{r['accumulated_mse']:>10.3g}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more")
    lines.append("alone: only that layer quantized (fp32 inputs); accum: the full int8 model up to that tensor; "
                 "SQNR on the held-out samples")
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
