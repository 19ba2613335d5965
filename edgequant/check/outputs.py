"""Per-output and per-part agreement of the int8 model with the fp32 one, folded batch by batch (memory: one
batch of outputs plus a few sums per channel), and the gate that refuses a grossly wrong int8 model.

Why per part: an output that concatenates values of very different ranges (a YOLO head: box coordinates up
to ~680 next to class scores in 0–1) looks fine in one summary number (cosine 0.9998) while one part is
destroyed (every score the same value). For each axis of an output but the batch axis (at most
``MAX_PART_AXIS`` long) the fp32 absolute maximum of every index is kept; indices whose maxima are at least a
decade apart (``RANGE_GAP``) form separate parts, each with its own SQNR and correlation.

With fp32 values x and int8 values x̂ of a part, over all its elements on all held-out samples:
SQNR = 10·log10(Σx² / Σ(x − x̂)²) dB; correlation = Pearson's r of x and x̂ (0 when x̂ is constant while x
is not: a collapsed part). Degenerate outputs are named, never scored as a perfect cosine: ``constant``
(fp32 the same everywhere, ``zero`` when that is 0), ``integer`` (not a float output: exact-match rate).

The gate (:func:`gross_failures`) — documented floors, in docs/fidelity.md:
- a part (or a whole output) with SQNR below ``PART_SQNR_FLOOR_DB`` or correlation below
  ``CORRELATION_FLOOR`` is destroyed;
- an output whose mean cosine is below ``COSINE_FLOOR``;
- a class-like output whose argmax agreement is below ``ARGMAX_FLOOR`` while its SQNR is below
  ``ARGMAX_SQNR_DB`` (random-weight models have near-tied logits whose argmax flips at any noise, so a low
  agreement alone proves nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .metrics import sqnr_from_sums

__all__ = ["ARGMAX_FLOOR", "CORRELATION_FLOOR", "COSINE_FLOOR", "PART_SQNR_FLOOR_DB", "OutputAgreement",
           "Part", "gate_message", "gross_failures"]

PART_SQNR_FLOOR_DB = 3.0
CORRELATION_FLOOR = 0.5
COSINE_FLOOR = 0.5
ARGMAX_FLOOR = 0.5
ARGMAX_SQNR_DB = 10.0
RANGE_GAP = 10.0
MAX_PART_AXIS = 4096


@dataclass
class Part:
    """Agreement of one part of an output: the indices ``index`` (a ``start:stop`` range or a list) of ``axis``."""

    name: str
    axis: int
    index: str
    sqnr_db: float
    correlation: float
    max_abs_error: float
    fp32_abs_max: float
    status: str = "ok"  # ok | constant

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class _Sums:
    """Σx, Σx̂, Σx², Σx̂², Σxx̂, Σ(x−x̂)², Σ|x−x̂|, n, max|x−x̂|, max|x|, min/max of x and x̂ — per index of one axis
    (``axis`` given) or over everything (``axis=None``)."""

    def __init__(self, size: int = 1) -> None:
        self.s = np.zeros((7, size))
        self.n = np.zeros(size)
        self.err = np.zeros(size)
        self.amax = np.zeros(size)
        self.lo = np.full((2, size), np.inf)
        self.hi = np.full((2, size), -np.inf)

    def add(self, x: np.ndarray, y: np.ndarray, reduce: tuple[int, ...] | None) -> None:
        d = x - y
        for k, v in enumerate((x, y, x * x, y * y, x * y, d * d, np.abs(d))):
            self.s[k] += v.sum(axis=reduce)
        self.n += x.size / max(self.n.size, 1) if reduce is not None else x.size
        self.err = np.maximum(self.err, np.abs(d).max(axis=reduce, initial=0.0))
        self.amax = np.maximum(self.amax, np.abs(x).max(axis=reduce, initial=0.0))
        for j, v in enumerate((x, y)):
            self.lo[j] = np.minimum(self.lo[j], v.min(axis=reduce, initial=np.inf))
            self.hi[j] = np.maximum(self.hi[j], v.max(axis=reduce, initial=-np.inf))

    def part(self, idx: np.ndarray) -> tuple[float, float, float, float, bool]:
        """Indices → (SQNR, correlation, max error, fp32 max, fp32 constant) of their union."""
        sx, sy, sxx, syy, sxy, sdd, _ = (float(v) for v in self.s[:, idx].sum(axis=1))
        n = float(self.n[idx].sum())
        constant = float(self.lo[0][idx].min()) == float(self.hi[0][idx].max())
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        cov = sxy - sx * sy / n
        if constant:
            corr = 1.0 if float(self.err[idx].max()) == 0.0 else 0.0
        elif vy <= 1e-12 * max(vx, 1e-30):
            corr = 0.0
        else:
            corr = float(np.clip(cov / math.sqrt(vx * vy), -1.0, 1.0))
        return sqnr_from_sums(sxx, sdd), corr, float(self.err[idx].max()), float(self.amax[idx].max()), constant


@dataclass
class OutputAgreement:
    """Streaming agreement of one output: ``update`` with each batch of fp32 and int8 values, then ``result``."""

    name: str
    samples: int = 0
    _total: _Sums = field(default_factory=_Sums)
    _axes: dict[int, _Sums] = field(default_factory=dict)
    _cos: list[float] = field(default_factory=list)
    _zero_ref: int = 0
    _argmax: int = 0
    _class_like: bool = False
    _integer: bool = False
    _exact: int = 0
    _elems: int = 0
    _pixels: int = 0
    _pixel_agree: int = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        """Fold a batch in, a few samples at a time (float64 copies of a few samples, not of the batch)."""
        if ref.ndim and ref.shape[0] > 1 and ref.dtype.kind in "fc":
            step = max(1, (4 << 20) // max(ref[0].size, 1))
            for i in range(0, ref.shape[0], step):
                self._update(ref[i:i + step], test[i:i + step])
        else:
            self._update(ref, test)

    def _update(self, ref: np.ndarray, test: np.ndarray) -> None:
        n = ref.shape[0] if ref.ndim else 1
        self.samples += n
        if ref.dtype.kind not in "fc":
            self._integer = True
            self._exact += int(np.sum(ref == test))
            self._elems += ref.size
            return
        x, y = ref.astype(np.float64), test.astype(np.float64)
        self._total.add(x, y, None)
        if ref.ndim >= 2:
            for axis in range(1, ref.ndim):
                if 2 <= ref.shape[axis] <= MAX_PART_AXIS:
                    sums = self._axes.setdefault(axis, _Sums(ref.shape[axis]))
                    sums.add(x, y, tuple(a for a in range(ref.ndim) if a != axis))
        a, b = x.reshape(n, -1), y.reshape(n, -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        ok = na > 0
        self._zero_ref += int(np.sum(~ok))
        cos = np.where(nb[ok] > 0, np.sum(a[ok] * b[ok], axis=1) / np.maximum(na[ok] * nb[ok], 1e-300), 0.0)
        self._cos.extend(cos.tolist())
        if ref.ndim == 2 and ref.shape[1] > 1:
            self._class_like = True
            self._argmax += int(np.sum(np.argmax(ref, axis=1) == np.argmax(test, axis=1)))
        elif ref.ndim == 4 and ref.shape[1] > 1:  # dense per-pixel classes (N, C, H, W): segmentation logits
            self._pixels += n * ref.shape[2] * ref.shape[3]
            self._pixel_agree += int(np.sum(np.argmax(ref, axis=1) == np.argmax(test, axis=1)))

    def result(self) -> dict:
        """→ the report entry: cosine (None when no sample has a non-zero fp32 output), SQNR, correlation,
        errors, argmax agreement, status, and the parts when the output mixes ranges."""
        if self._integer:
            return {"output": self.name, "samples": self.samples, "status": "integer", "cosine": None,
                    "exact_match": round(self._exact / max(self._elems, 1), 6),
                    "note": "integer output: compared for exact equality, no cosine"}
        t = self._total
        sqnr, corr, err, amax, constant = t.part(np.array([0]))
        status = ("zero" if amax == 0.0 else "constant") if constant else "ok"
        cos = float(np.mean(self._cos)) if self._cos else None
        out = {"output": self.name, "samples": self.samples, "status": status,
               "cosine": None if constant else (round(cos, 6) if cos is not None else None),
               "sqnr_db": round(sqnr, 3), "correlation": round(corr, 6), "max_abs_error": round(err, 6),
               "mean_abs_error": None, "fp32_abs_max": round(amax, 6),
               "argmax_agreement": round(self._argmax / self.samples, 6) if self._class_like else None}
        out["mean_abs_error"] = round(float(t.s[6, 0]) / max(float(t.n[0]), 1.0), 6)
        if self._pixels:
            out["pixel_argmax_agreement"] = round(self._pixel_agree / self._pixels, 6)
        if self._zero_ref and not constant:
            out["zero_fp32_samples"] = self._zero_ref
        if constant:
            out["note"] = (f"the fp32 output is {'zero' if amax == 0.0 else 'constant'} on every held-out sample: "
                           "it cannot be checked meaningfully")
        parts = self._parts()
        if parts:
            out["parts"] = [p.to_dict() for p in parts]
        return out

    def _parts(self) -> list[Part]:
        best: tuple[float, int, list[np.ndarray]] | None = None
        for axis, sums in self._axes.items():
            groups, gap = _split_by_range(sums.amax)
            if len(groups) > 1 and (best is None or gap > best[0]):
                best = (gap, axis, groups)
        if best is None:
            return []
        _, axis, groups = best
        sums = self._axes[axis]
        parts = []
        for idx in groups:
            sqnr, corr, err, amax, constant = sums.part(idx)
            label = _index_label(idx)
            parts.append(Part(f"{self.name}[axis {axis}: {label}]", axis, label, sqnr, corr, err, amax,
                              "constant" if constant else "ok"))
        return parts


def _split_by_range(amax: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Per-index absolute maxima → index groups separated by gaps of at least ``RANGE_GAP`` in magnitude
    (all-zero indices join the smallest group), and the largest gap (as a factor)."""
    nz = np.nonzero(amax > 0)[0]
    if nz.size < 2:
        return [np.arange(amax.size)], 1.0
    logs = np.log10(amax[nz])
    order = np.argsort(logs)
    steps = np.diff(logs[order])
    cuts = np.nonzero(steps >= math.log10(RANGE_GAP))[0]
    if not cuts.size:
        return [np.arange(amax.size)], float(10 ** steps.max()) if steps.size else 1.0
    groups, start = [], 0
    for c in [*cuts.tolist(), len(order) - 1]:
        groups.append(np.sort(nz[order[start:c + 1]]))
        start = c + 1
    zeros = np.nonzero(amax <= 0)[0]
    if zeros.size:
        groups[0] = np.sort(np.concatenate([groups[0], zeros]))
    groups.sort(key=lambda g: int(g[0]))
    return groups, float(10 ** steps.max())


def _index_label(idx: np.ndarray) -> str:
    if idx.size and int(idx[-1]) - int(idx[0]) + 1 == idx.size:
        return f"{int(idx[0])}:{int(idx[-1]) + 1}"
    shown = ",".join(str(int(i)) for i in idx[:8])
    return f"[{shown}{',…' if idx.size > 8 else ''}] ({idx.size} indices)"


def gross_failures(results: Sequence[dict]) -> list[tuple[str, str]]:
    """Per-output results (``OutputAgreement.result()``) → [(what, why)] for every output or part that breaks
    a floor (see the module docstring), worst first (by SQNR)."""
    found: list[tuple[float, str, str]] = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for p in r.get("parts", []):
            if p["status"] == "ok" and (p["sqnr_db"] < PART_SQNR_FLOOR_DB or p["correlation"] < CORRELATION_FLOOR):
                found.append((p["sqnr_db"], p["name"], f"SQNR {p['sqnr_db']:.1f} dB, correlation "
                              f"{p['correlation']:.2f} (floors {PART_SQNR_FLOOR_DB:g} dB, {CORRELATION_FLOOR:g})"))
        name = r["output"]
        if r["sqnr_db"] < PART_SQNR_FLOOR_DB or r["correlation"] < CORRELATION_FLOOR:
            found.append((r["sqnr_db"], name, f"SQNR {r['sqnr_db']:.1f} dB, correlation {r['correlation']:.2f} "
                          f"(floors {PART_SQNR_FLOOR_DB:g} dB, {CORRELATION_FLOOR:g})"))
        elif r["cosine"] is not None and r["cosine"] < COSINE_FLOOR:
            found.append((r["sqnr_db"], name, f"cosine {r['cosine']:.3f} (floor {COSINE_FLOOR:g})"))
        elif (r["argmax_agreement"] is not None and r["argmax_agreement"] < ARGMAX_FLOOR
              and r["sqnr_db"] < ARGMAX_SQNR_DB):
            found.append((r["sqnr_db"], name, f"argmax agreement {100 * r['argmax_agreement']:.1f}% at SQNR "
                          f"{r['sqnr_db']:.1f} dB (floor {100 * ARGMAX_FLOOR:g}% below {ARGMAX_SQNR_DB:g} dB)"))
    return [(what, why) for _, what, why in sorted(found, key=lambda f: f[0])]


def gate_message(failures: Sequence[tuple[str, str]], layers: Sequence[dict] | None, model, method: str) -> str:
    """Gate failures + the per-layer rows (worst first) + the fp32 graph → one line: the worst output part,
    the worst layer, and the fix to try first."""
    what, why = failures[0]
    worst = ""
    fix = ""
    output = what.split("[", 1)[0]
    if layers:
        # the layer that writes the failing output quantizes it last: name it before the lowest SQNR overall,
        # which an output dominated by its largest channels would hide
        w = next((r for r in layers if r["tensor"] == output), layers[0])
        worst = f"; worst layer {w['node'] or w['tensor']!r} ({w['op_type']}, alone {w['alone_sqnr_db']:.1f} dB)"
        fix = f"keep that layer float (--exclude {w['node']})" if w["node"] else ""
    concat = _final_concat(model, output)
    if concat and "[axis" in what:
        fix = (f"the output concatenates values of different ranges: keep its final Concat float "
               f"(--exclude {concat})")
    elif method in ("entropy", "percentile", "mse"):
        fix = f"try --method minmax ({method} clips ranges){'; or ' + fix if fix else ''}"
    if not fix:
        fix = "set --accuracy-budget cosine>=0.99 to keep the most sensitive layers float"
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return (f"the int8 model is grossly wrong on the held-out samples: {what} {why}{more}{worst}. Fix: {fix}. "
            "Nothing was written; --allow-inaccurate (allow_inaccurate=True) writes it anyway and records this "
            "in the report")


def _final_concat(model, output: str) -> str | None:
    """The Concat node that produces ``output`` (through shape-only ops), or None."""
    if model is None:
        return None
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(output)
    for _ in range(8):
        if node is None:
            return None
        if node.op_type == "Concat":
            return node.name
        if node.op_type not in ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast"):
            return None
        node = producers.get(node.input[0])
    return None
