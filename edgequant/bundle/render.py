"""Figures and pages people look at rather than read: report → per-layer PNG plot and a self-contained HTML page;
bench result → PNG plot.

Plots use matplotlib (the ``plot`` extra) with the Agg backend, imported only here and only when called; without
matplotlib the plot is skipped with a log line and the page is written without it. The HTML page has no external
resource (inline CSS, the PNG as a data URI), so it opens offline, on the device or from an e-mail.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from typing import Any

from ..units import format_bytes, precision_label

__all__ = ["bench_png", "layers_png", "report_html", "report_pages"]

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;color:#1b1f24;
background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d0d7de}
.sub{color:#57606a;margin:0 0 16px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eaeef2;text-align:left}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#ffebe9}
img{max-width:100%;border:1px solid #d0d7de}
.kv td:first-child{color:#57606a;width:180px}
code{font-size:12px}
"""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install 'edgequant[plot]'): no plot written")
        return None
    return plt


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def layers_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Layer rows (report.json's ``layers``) → PNG: SQNR per quantized tensor in graph order, the error each layer
    adds alone (bars) and the error accumulated up to it (line). None without matplotlib or rows."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    ordered = sorted(rows, key=lambda r: r["index"])
    labels = [_cut(f"{r['tensor']} ({r['module']})" if r.get("module") else r["tensor"], 34) for r in ordered]
    x = list(range(len(ordered)))
    width = min(16.0, max(7.0, 0.35 * len(ordered) + 3))
    fig, ax = plt.subplots(figsize=(width, 4.6))
    alone = [r["alone_sqnr_db"] for r in ordered]
    worst = min(alone)
    colors = ["#cf222e" if a == worst else "#54aeff" for a in alone]
    ax.bar(x, alone, color=colors, label="this layer alone")
    ax.plot(x, [r["accumulated_sqnr_db"] for r in ordered], color="#1b1f24", marker="o", ms=3,
            label="accumulated (full int8 model)")
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7 if len(x) > 30 else 8)
    ax.set_ylabel("SQNR (dB, higher is better)")
    ax.set_title("int8 vs fp32 per quantized tensor, held-out samples", pad=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, framealpha=0.95)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), ax.get_ylim()[1] * 1.15)
    fig.tight_layout()
    return _png(fig, plt)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def report_html(report: dict[str, Any], png: bytes | None) -> str:
    """A bundle report (+ its layer plot) → one self-contained HTML page."""
    e = html.escape
    s = report.get("sizes", {})
    kv = [("target", report.get("target", "")), ("method", report.get("method", "")),
          ("source", report.get("source", ""))]
    if s:
        kv.append(("size", f"fp32 {format_bytes(s['fp32_bytes'])} → {precision_label(report)} "
                           f"{format_bytes(s['int8_bytes'])} ({100 * s['ratio']:.1f}%)"))
    hold = report.get("holdout", {})
    if hold:
        kv.append(("held-out samples", str(hold.get("samples"))))
    k = report.get("kernels")
    if k:
        kv.append(("int8 kernels", ", ".join(f"{op} {n}" for op, n in k["int8"].items()) or "none"))
        kv.append(("left in float", ", ".join(k["float_compute"]) or "no Conv/MatMul/Gemm"))
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>edgequant report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>edgequant report</h1>",
             f"<p class=sub>edgequant {e(str(report.get('edgequant_version', '')))}</p><table class=kv>",
             *(f"<tr><td>{e(a)}</td><td>{e(str(b))}</td></tr>" for a, b in kv), "</table>"]
    fid = report.get("fidelity") or []
    if fid:
        parts.append("<h2>Outputs: int8 vs fp32</h2><table><tr><th>output</th><th>cosine</th><th>max |err|</th>"
                     "<th>mean |err|</th><th>|fp32| max</th><th>argmax agreement</th><th>samples</th></tr>")
        for f in fid:
            agree = f"{100 * f['argmax_agreement']:.2f}%" if f.get("argmax_agreement") is not None else "–"
            if f.get("pixel_argmax_agreement") is not None:
                agree = f"{100 * f['pixel_argmax_agreement']:.2f}% of pixels"
            if f.get("cosine") is None:
                parts.append(f"<tr><td>{e(f['output'])}</td><td colspan=5>{e(f.get('status', ''))}: "
                             f"{e(f.get('note') or '')}</td><td class=n>{f['samples']}</td></tr>")
                continue
            parts.append(f"<tr><td>{e(f['output'])}</td><td class=n>{f['cosine']:.5f}</td>"
                         f"<td class=n>{f['max_abs_error']:.4g}</td><td class=n>{f['mean_abs_error']:.4g}</td>"
                         f"<td class=n>{f['fp32_abs_max']:.4g}</td><td class=n>{agree}</td>"
                         f"<td class=n>{f['samples']}</td></tr>")
            for p in f.get("parts", []):
                parts.append(f"<tr><td>&nbsp;&nbsp;{e(p['name'])}</td><td class=n>SQNR {p['sqnr_db']:.1f} dB</td>"
                             f"<td class=n>{p['max_abs_error']:.4g}</td><td class=n>r {p['correlation']:.4f}</td>"
                             f"<td class=n>{p['fp32_abs_max']:.4g}</td><td class=n>–</td><td></td></tr>")
        parts.append("</table>")
    rows = report.get("layers") or []
    if rows:
        parts.append("<h2>Where the error comes from</h2>")
        if png:
            uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            parts.append(f'<img id=layers-plot alt="SQNR per quantized tensor" src="{uri}">')
        parts.append("<p class=sub>SQNR = 10·log10(Σx² / Σ(x − x̂)²) between fp32 and int8 values of each "
                     "quantized tensor. <b>alone</b>: only the layer producing it is quantized, fed fp32 inputs; "
                     "<b>accumulated</b>: the full int8 model up to that tensor. Worst alone first.</p>")
        parts.append("<table><tr><th>#</th><th>tensor</th><th>ONNX node</th><th>op</th><th>PyTorch module</th>"
                     "<th>alone dB</th><th>accumulated dB</th><th>accumulated MSE</th><th>alone MSE</th></tr>")
        worst = rows[0]["alone_sqnr_db"]
        for r in rows:
            cls = " class=bad" if r["alone_sqnr_db"] == worst else ""
            parts.append(f"<tr{cls}><td class=n>{r['index']}</td><td><code>{e(r['tensor'])}</code></td>"
                         f"<td><code>{e(r['node'] or '(input)')}</code></td><td>{e(r['op_type'])}</td>"
                         f"<td><code>{e(r['module'] or '–')}</code></td><td class=n>{r['alone_sqnr_db']:.2f}</td>"
                         f"<td class=n>{r['accumulated_sqnr_db']:.2f}</td><td class=n>{r['accumulated_mse']:.3g}</td>"
                         f"<td class=n>{r['alone_mse']:.3g}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def bench_png(result: dict[str, Any]) -> bytes | None:
    """A bench result (``BenchResult.to_dict()``) → PNG: median latency per configuration and model, whiskers to
    p90, with the int8/fp32 ratio written above each pair. None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    configs = sorted({(r["batch"], r["threads"]) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {"fp32": "#8c959f", "int8": "#0969da"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(configs) + 3), 4.2))
    w = 0.8 / len(models)
    for j, m in enumerate(models):
        xs, ys, err = [], [], []
        for i, c in enumerate(configs):
            r = next((r for r in rows if (r["batch"], r["threads"]) == c and r["model"] == m), None)
            if r:
                xs.append(i + (j - (len(models) - 1) / 2) * w)
                ys.append(r["p50_ms"])
                err.append(r["p90_ms"] - r["p50_ms"])
        ax.bar(xs, ys, w, yerr=[[0] * len(err), err], capsize=3, label=m, color=colors.get(m, "#57606a"))
    for ratio in result.get("ratios", []):
        i = configs.index((ratio["batch"], ratio["threads"]))
        top = max(r["p90_ms"] for r in rows if (r["batch"], r["threads"]) == configs[i])
        ax.text(i, top * 1.04, f"int8/fp32 {ratio['int8_over_fp32_p50']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"batch {b}\n{t} thread{'s' if t > 1 else ''}" for b, t in configs], fontsize=8)
    ax.set_ylabel("latency per run, ms (median, whisker to p90)")
    ax.set_title(f"{result.get('name', '')} on {result.get('provider', '')}", fontsize=10)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig, plt)


def report_pages(report: dict) -> dict[str, bytes]:
    """report.json's layer table → {"layers.png": plot (when matplotlib is there), "report.html": page}."""
    png = layers_png(report["layers"])
    files = {"report.html": report_html(report, png).encode("utf-8")}
    if png is not None:
        files["layers.png"] = png
    return files
