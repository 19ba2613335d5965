"""Per-output and per-part agreement of the int8 model with the fp32 one, folded batch by batch (memory: one
batch of outputs plus a few sums per index of one axis), and the gate that refuses a grossly wrong int8 model.

What an output is comes from the graph (check/layout.py), never from its values alone:
- **parts**: an output whose axis a Concat built from branches of very different ranges (a YOLO head: box
  coordinates up to ~680 next to class scores in 0–1) looks fine in one summary number (cosine 0.9998) while
  one part is destroyed (every score the same value). Along that axis only, the Concat's pieces whose fp32
  absolute maxima are at least a decade apart (``RANGE_GAP``) form separate parts, each with its own SQNR and
  correlation. No other output is cut: image rows and columns are never parts.
- **dense maps** (N, C, H, W) over the input's pixels are scored as maps: a one-channel map with values in
  [0, 1] (text, mask probability) by its IoU at ``MAP_THRESHOLD`` (pixels above it in fp32 vs in int8),
  segmentation logits (C > 1) by per-pixel argmax agreement, any map by its SQNR over the whole map.

With fp32 values x and int8 values x̂ of a part, over all its elements on all held-out samples:
SQNR = 10·log10(Σx² / Σ(x − x̂)²) dB; correlation = Pearson's r of x and x̂ (0 when x̂ is constant while x
is not: a collapsed part). Degenerate outputs are named, never scored as a perfect cosine: ``constant``
(fp32 the same everywhere, ``zero`` when that is 0), ``integer`` (not a float output: exact-match rate).

The gate (:func:`gross_failures`) — documented floors, in docs/fidelity.md. An output with a task metric
(map IoU, pixel argmax agreement of a dense map, detection agreement) is judged by that metric alone: it fails
below ``MAP_IOU_FLOOR`` / ``ARGMAX_FLOOR`` (pixels, where also SQNR < ``ARGMAX_SQNR_DB``) /
``DETECTION_FLOOR`` and passes above, whatever its SQNR. Other outputs:
- a part (or a whole output) with SQNR below ``PART_SQNR_FLOOR_DB``, or with correlation below
  ``CORRELATION_FLOOR`` while its SQNR is below ``CORRELATION_SQNR_DB``, is destroyed (at that SQNR the int8
  values are within a tenth of the fp32 ones: a low correlation there only says that the fp32 output hardly
  varies across the samples, by less than the int8 step — a voice detector's probability on silence, say);
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

from .layout import ConcatPieces
from .metrics import sqnr_from_sums

__all__ = ["ARGMAX_FLOOR", "CORRELATION_FLOOR", "CORRELATION_SQNR_DB", "COSINE_FLOOR", "DETECTION_FLOOR",
           "MAP_IOU_FLOOR", "MAP_THRESHOLD", "PART_SQNR_FLOOR_DB", "OutputAgreement", "Part", "gate_message",
           "gross_failures"]

PART_SQNR_FLOOR_DB = 3.0
CORRELATION_FLOOR = 0.5
CORRELATION_SQNR_DB = 20.0
COSINE_FLOOR = 0.5
ARGMAX_FLOOR = 0.5
ARGMAX_SQNR_DB = 10.0
MAP_THRESHOLD = 0.5
MAP_IOU_FLOOR = 0.5
DETECTION_FLOOR = 0.5
RANGE_GAP = 10.0


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
    pieces: ConcatPieces | None = None  # the axis a Concat built (check/layout.py): the only one cut into parts
    dense: bool = False  # a dense map over the input's pixels (check/layout.py)
    samples: int = 0
    _total: _Sums = field(default_factory=_Sums)
    _axis: _Sums | None = None
    _map: list[int] = field(default_factory=lambda: [0, 0])  # pixels above MAP_THRESHOLD in both, in either
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
        p = self.pieces
        if p is not None and 0 < p.axis < ref.ndim and ref.shape[p.axis] == p.pieces[-1][1] and not (
                self.dense and p.axis >= 2):
            if self._axis is None:
                self._axis = _Sums(ref.shape[p.axis])
            self._axis.add(x, y, tuple(a for a in range(ref.ndim) if a != p.axis))
        if self.dense:
            a, b = ref > MAP_THRESHOLD, test > MAP_THRESHOLD
            self._map[0] += int(np.count_nonzero(a & b))
            self._map[1] += int(np.count_nonzero(a | b))
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
        if self.dense:
            out.update(self._map_result(t))
        if self._zero_ref and not constant:
            out["zero_fp32_samples"] = self._zero_ref
        if constant:
            out["note"] = (f"the fp32 output is {'zero' if amax == 0.0 else 'constant'} on every held-out sample: "
                           "it cannot be checked meaningfully")
        parts = self._parts()
        if parts:
            out["parts"] = [p.to_dict() for p in parts]
        return out

    def _map_result(self, t: _Sums) -> dict:
        """A dense map → its kind, and for a probability map (one channel, fp32 in [0, 1]) the IoU at
        MAP_THRESHOLD (None when neither model puts a pixel above it)."""
        if self._pixels:
            return {"map": "classes"}
        if float(t.lo[0].min()) < 0.0 or float(t.hi[0].max()) > 1.0:
            return {"map": "values"}
        inter, union = self._map
        return {"map": "probability", "map_threshold": MAP_THRESHOLD,
                "map_iou": round(inter / union, 6) if union else None}

    def _parts(self) -> list[Part]:
        """The Concat's pieces grouped by range (pieces a decade or more apart are separate parts) → the parts;
        none when all pieces share one range."""
        sums, p = self._axis, self.pieces
        if sums is None or p is None:
            return []
        piece_max = np.array([float(sums.amax[a:b].max(initial=0.0)) for a, b in p.pieces])
        groups = _group_by_range(piece_max)
        if len(groups) < 2:
            return []
        parts = []
        for g in groups:
            idx = np.concatenate([np.arange(*p.pieces[k]) for k in g])
            sqnr, corr, err, amax, constant = sums.part(idx)
            label = _index_label(idx)
            parts.append(Part(f"{self.name}[axis {p.axis}: {label}]", p.axis, label, sqnr, corr, err, amax,
                              "constant" if constant else "ok"))
        return parts


def _group_by_range(amax: np.ndarray) -> list[list[int]]:
    """Per-piece absolute maxima → piece groups separated by gaps of at least ``RANGE_GAP`` in magnitude (all-zero
    pieces join the smallest group), in index order."""
    nz = np.nonzero(amax > 0)[0]
    if nz.size < 2:
        return [list(range(amax.size))]
    order = nz[np.argsort(np.log10(amax[nz]), kind="stable")]
    steps = np.diff(np.log10(amax[order]))
    groups, start = [], 0
    for c in [*np.nonzero(steps >= math.log10(RANGE_GAP))[0].tolist(), len(order) - 1]:
        groups.append(sorted(order[start:c + 1].tolist()))
        start = c + 1
    groups[0] = sorted(groups[0] + np.nonzero(amax <= 0)[0].tolist())
    return sorted(groups, key=lambda g: g[0])


def _index_label(idx: np.ndarray) -> str:
    if idx.size and int(idx[-1]) - int(idx[0]) + 1 == idx.size:
        return f"{int(idx[0])}:{int(idx[-1]) + 1}"
    shown = ",".join(str(int(i)) for i in idx[:8])
    return f"[{shown}{',…' if idx.size > 8 else ''}] ({idx.size} indices)"


def _destroyed(r: dict) -> bool:
    """An output's or part's result → below the SQNR floor, or uncorrelated at an SQNR that shows it."""
    return r["sqnr_db"] < PART_SQNR_FLOOR_DB or (r["correlation"] < CORRELATION_FLOOR
                                                 and r["sqnr_db"] < CORRELATION_SQNR_DB)


def gross_failures(results: Sequence[dict], detection: dict | None = None) -> list[tuple[str, str]]:
    """Per-output results (``OutputAgreement.result()``) and the detection agreement entry (check/detection.py,
    or None) → [(what, why)] for every output or part that breaks a floor (see the module docstring), worst
    first (by SQNR)."""
    found: list[tuple[float, str, str]] = []
    for r in results:
        if r.get("status") != "ok":
            continue
        name = r["output"]
        task = _task_verdict(r, detection if detection and detection.get("output") == name else None)
        if task is not None:
            if task:
                found.append((r["sqnr_db"], name, task))
            continue
        for p in r.get("parts", []):
            if p["status"] == "ok" and _destroyed(p):
                found.append((p["sqnr_db"], p["name"], f"SQNR {p['sqnr_db']:.1f} dB, correlation "
                              f"{p['correlation']:.2f} (floors {PART_SQNR_FLOOR_DB:g} dB, {CORRELATION_FLOOR:g})"))
        if _destroyed(r):
            found.append((r["sqnr_db"], name, f"SQNR {r['sqnr_db']:.1f} dB, correlation {r['correlation']:.2f} "
                          f"(floors {PART_SQNR_FLOOR_DB:g} dB, {CORRELATION_FLOOR:g})"))
        elif r["cosine"] is not None and r["cosine"] < COSINE_FLOOR:
            found.append((r["sqnr_db"], name, f"cosine {r['cosine']:.3f} (floor {COSINE_FLOOR:g})"))
        elif (r["argmax_agreement"] is not None and r["argmax_agreement"] < ARGMAX_FLOOR
              and r["sqnr_db"] < ARGMAX_SQNR_DB):
            found.append((r["sqnr_db"], name, f"argmax agreement {100 * r['argmax_agreement']:.1f}% at SQNR "
                          f"{r['sqnr_db']:.1f} dB (floor {100 * ARGMAX_FLOOR:g}% below {ARGMAX_SQNR_DB:g} dB)"))
    return [(what, why) for _, what, why in sorted(found, key=lambda f: f[0])]


def _task_verdict(r: dict, detection: dict | None) -> str | None:
    """An output's result → None where it has no task metric, "" where its task metric holds, else why not."""
    if detection is not None and detection.get("status") == "ok":
        a = detection["agreement"]
        return "" if a >= DETECTION_FLOOR else (f"detection agreement {100 * a:.1f}% (floor "
                                                f"{100 * DETECTION_FLOOR:g}%)")
    if r.get("map_iou") is not None:
        iou = r["map_iou"]
        return "" if iou >= MAP_IOU_FLOOR else (f"map IoU {iou:.3f} at p > {r['map_threshold']:g} (floor "
                                                f"{MAP_IOU_FLOOR:g})")
    if r.get("map") == "classes":
        agree = r["pixel_argmax_agreement"]
        if agree >= ARGMAX_FLOOR or r["sqnr_db"] >= ARGMAX_SQNR_DB:
            return ""
        return (f"pixel argmax agreement {100 * agree:.1f}% at SQNR {r['sqnr_db']:.1f} dB (floor "
                f"{100 * ARGMAX_FLOOR:g}% below {ARGMAX_SQNR_DB:g} dB)")
    return None


def gate_message(failures: Sequence[tuple[str, str]], advice: str, method: str) -> str:
    """Gate failures + the advice a trial backs (check/advice.py) → one line: the worst output or part, what
    is known about its cause, and the fix to try first."""
    what, why = failures[0]
    if method in ("entropy", "percentile", "mse"):
        advice = f"try --method minmax ({method} clips ranges); {advice}"
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return (f"the int8 model is grossly wrong on the held-out samples: {what} {why}{more}. {advice}. "
            "Nothing was written; --allow-inaccurate (allow_inaccurate=True) writes it anyway and records this "
            "in the report")
