"""Advice for an int8 model the gate refuses, backed by trials: a layer is named only where quantizing the
model again with that layer kept float makes the failing output (or part) pass the gate.

Candidates are the quantized layers upstream of the failing output (rows of the per-layer table whose node is an
ancestor of it in the graph): first those that write the output or one of the tensors its Concat joins (the
last quantization the values go through), then the rest by their "alone" SQNR, worst first — at most
``MAX_TRIALS``. Where none fixes it, the advice says which were tried and what to do instead; it never names
a layer on the strength of its table row alone (a layer can be the worst of the table and harmless).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import onnx

from ..graph.index import producers
from .layout import concat_pieces
from .outputs import gross_failures

__all__ = ["MAX_TRIALS", "advise"]

log = logging.getLogger(__name__)

MAX_TRIALS = 3
BUDGET_HINT = "set --accuracy-budget cosine>=0.99 to keep the most sensitive layers float"


def advise(failures: Sequence[tuple[str, str]], layers: Sequence[dict] | None, model: onnx.ModelProto,
           requantize: Callable[[list[str]], list[dict]]) -> str:
    """Gate failures (worst first) + per-layer rows + the graph the quantizer saw + ``requantize(extra float
    nodes) → per-output results`` → one sentence of advice ("Fix: ..." where a trial backs a layer)."""
    what = failures[0][0]
    output = what.split("[", 1)[0]
    tried = []
    for row in candidates(model, output, layers or []):
        node = row["node"]
        results = requantize([node])
        still = [w for w, _ in gross_failures(results) if w.split("[", 1)[0] == output]
        tried.append(node)
        log.info("trial: %s kept float → %s", node, "still failing" if still else "passes")
        if not still:
            fixed = next((r for r in results if r["output"] == output), {})
            return (f"Fix: keep layer {node!r} ({row['op_type']}) float (--exclude {node}): a trial with it float "
                    f"passes the gate (output SQNR {fixed.get('sqnr_db', float('nan')):.1f} dB)")
    if tried:
        return (f"keeping any one of {', '.join(repr(t) for t in tried)} float (tried each) does not fix it, so no "
                f"single layer is to blame; {BUDGET_HINT}")
    return f"no quantized layer feeds it; {BUDGET_HINT}"


def candidates(model: onnx.ModelProto, output: str, layers: Sequence[dict]) -> list[dict]:
    """The graph + an output + per-layer rows → the rows to try keeping float, in order (see the module
    docstring), at most MAX_TRIALS."""
    prod = producers(model.graph)
    found = concat_pieces(model).get(output)
    ends = {output, *(b for branch in (found.branches if found else ()) for b in branch)}
    above: set[str] = set()
    stack = [output]
    while stack:
        node = prod.get(stack.pop())
        if node is None or node.name in above:
            continue
        above.add(node.name)
        stack.extend(i for i in node.input if i)
    rows = [r for r in layers if r["node"] and r["node"] in above]
    near = [r for r in rows if r["tensor"] in ends]
    rest = sorted((r for r in rows if r not in near), key=lambda r: r["alone_sqnr_db"])
    picked: list[dict] = []
    for r in (*near, *rest):
        if r["node"] not in {p["node"] for p in picked}:
            picked.append(r)
    return picked[:MAX_TRIALS]
