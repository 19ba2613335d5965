"""The conformance corpus: third-party graphs from independent sources through edgequant, onnxruntime's
``quantize_static`` (QDQ, U8S8, per-channel, reduce_range) and NNCF (``nncf.quantize`` on the ONNX model).

    pip install -e .[zoo,compare]
    python benchmarks/corpus.py [--only NAME,…] [--source wheel,handmade] [--tools edgequant,ort,nncf]
                                [--timeout 900] [--write-docs]

benchmarks/corpus_sources.py lists the graphs. Per graph and tool it prints the outcome — written, refused (the
error's one line), internal error (type, message and the edgequant function it came from), or failed (a peer) —
with its time and peak memory, then per written model: the task metric against fp32 on held-out inputs, SQNR per
output, int8/fp32 latency (batch 1, one thread, interleaved, under ``flock /tmp/eq-timing.lock``) and the float
compute nodes ONNX Runtime's CPU provider leaves. Every step runs in its own process under a timeout and an
address-space limit, so one crash ends one graph, not the run. The fp32 ONNX, the data and each tool's result are
cached in benchmarks/results/corpus/ (delete a graph's folder to redo it; ``--fresh`` redoes the tools), so the
corpus can run in pieces and ``--write-docs`` writes docs/compatibility.md from everything cached.

edgequant runs with its defaults (as ``edgequant export model.onnx``: target generic-cpu) on the calibration feeds
without their batch axis; the peers on the same feeds with it. Calibration: 16 feeds; held out: 8 (40 for the
text recognizer, 24 consecutive chunks for voice activity).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pickle
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "corpus"
sys.path.insert(0, str(HERE))
TOOLS = ("edgequant", "ort", "nncf")
CALIB = 16
MEM_LIMIT = 12_000_000_000


def _held(task: str) -> int:
    return 40 if task in ("ctc",) else 24 if task == "vad" else 8


def folder_of(name: str) -> Path:
    return RESULTS / name.replace("/", "__")


def _peak_rss() -> int:
    """This process's own high-water mark (ru_maxrss would carry the parent's through fork and exec)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024


def _internal(exc: BaseException) -> str:
    """An unexpected exception → 'Type: message (file.py:function)' at the innermost edgequant frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}edgequant{os.sep}" in f.filename] or frames
    where = f"{Path(ours[-1].filename).parent.name}/{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else "?"
    line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {line} ({where})"


# ---------------------------------------------------------------- workers (one process each)

def prepare(name: str) -> None:
    """The graph's fp32 ONNX, calibration and held-out feeds, and metadata → its folder."""
    import onnx

    from corpus_sources import graphs

    g, folder = graphs()[name], folder_of(name)
    folder.mkdir(parents=True, exist_ok=True)
    model = g.make()
    props = {p.key: p.value for p in model.metadata_props}
    meta = {**g.meta, "export_error": props.get("corpus.export_error")}
    if g.task == "ctc":
        meta["characters"] = props["character"].splitlines()
    onnx.save(model, str(folder / "fp32.onnx"))
    calib, held = g.data(model, CALIB, 0), g.data(model, _held(g.task), 1000)
    if g.name == "wheel/ppocr_cls":  # the labels: every other line is upside down
        meta["labels"] = [i % 2 for i in range(len(held))]
    if g.task == "ctc":  # the rendered strings (corpus_data.ocr_lines draws them with the same seed)
        from corpus_data import text_lines

        meta["texts"] = text_lines(len(held), 1000)
    (folder / "calib.pkl").write_bytes(pickle.dumps(calib))
    (folder / "held.pkl").write_bytes(pickle.dumps(held))
    (folder / "meta.json").write_text(json.dumps(meta))


def unbatched(model, feeds: list[dict]) -> list[dict]:
    """Feeds as edgequant's calibration data takes them, without their batch axis: the first axis the graph leaves
    free (a dim_param or no size; for a time-major sequence or a recurrent state, not axis 0) where the feed has
    size 1, else axis 0 where it is 1. Scalars and other inputs are given as they are."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    out = []
    for feed in feeds:
        d = {}
        for k, v in feed.items():
            declared = dims.get(k) or []
            free = [a for a, dim in enumerate(declared) if dim.dim_value <= 0 and a < v.ndim and v.shape[a] == 1]
            if not free and v.ndim and v.shape[0] == 1 and (not declared or declared[0].dim_value == 1):
                free = [0]  # unknown rank, or a batch fixed at 1 by the export: the leading axis
            d[k] = np.squeeze(v, axis=free[0]) if free else v
        out.append(d)
    return out


def run_tool(tool: str, name: str) -> dict:
    """One tool on one graph in this process → ``<tool>.onnx`` and the outcome dict."""
    import onnx

    folder = folder_of(name)
    calib = pickle.loads((folder / "calib.pkl").read_bytes())
    fp32_path = folder / "fp32.onnx"
    t0 = time.perf_counter()
    try:
        if tool in ("edgequant", "edgequant_allow"):  # the second: --allow-inaccurate, to score a refused model
            import edgequant
            from edgequant.errors import EdgeQuantError

            meta = json.loads((folder / "meta.json").read_text())
            try:
                if meta.get("export_error"):  # what a user passing the nn.Module gets
                    kind = "refused" if meta["export_error"].startswith("ExportError") else "internal error"
                    return {"outcome": kind, "line": "export: " + meta["export_error"], "seconds": 0, "peak_gb": 0}
                b = edgequant.export(str(fp32_path), unbatched(onnx.load(str(fp32_path)), calib), out=folder / "bundle",
                                     force=True, progress=False, allow_inaccurate=tool == "edgequant_allow")
                (folder / f"{tool}.onnx").write_bytes(b.model_path.read_bytes())
                outcome = {"outcome": "written"}
            except EdgeQuantError as exc:
                outcome = {"outcome": "refused", "line": (str(exc).strip().splitlines() or [""])[0][:400]}
        elif tool == "ort":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(calib)

                def get_next(self):
                    return next(self.it, None)

            quantize_static(str(fp32_path), str(folder / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=True)
            outcome = {"outcome": "written"}
        else:
            import nncf

            q = nncf.quantize(onnx.load(str(fp32_path)), nncf.Dataset(calib), subset_size=len(calib))
            onnx.save(q, str(folder / "nncf.onnx"))
            outcome = {"outcome": "written"}
    except Exception as exc:  # every failure is a finding, recorded with where it came from
        outcome = {"outcome": "internal error" if tool.startswith("edgequant") else "failed", "line": _internal(exc)}
    outcome.update(seconds=round(time.perf_counter() - t0, 1), peak_gb=round(_peak_rss() / 2**30, 2))
    return outcome


def text_accuracy(probs: np.ndarray, meta: dict) -> float:
    """CTC posteriors → the fraction of lines decoded exactly as rendered."""
    from corpus_metrics import ctc_decode

    return float(np.mean([a == b for a, b in zip(ctc_decode(probs, meta["characters"]), meta["texts"])]))


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _outputs(path: Path, feeds: list[dict]) -> tuple[list[str], list[np.ndarray]]:
    s = _session(path)
    names = {i.name for i in s.get_inputs()}
    runs = [s.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]
    outs = [np.concatenate([np.asarray(r[k]).reshape(1, *np.shape(r[k])) if np.ndim(r[k]) == 0 else r[k]
                            for r in runs]) for k in range(len(runs[0]))]
    return [o.name for o in s.get_outputs()], outs


def evaluate(name: str, tools: list[str]) -> dict:
    """The written models of one graph on its held-out feeds → fidelity per output, the task metric, float
    compute nodes left."""
    import onnx

    from corpus_metrics import output_sqnr, task_metric
    from corpus_sources import graphs
    from edgequant.check.fidelity import cpu_kernels

    g, folder = graphs()[name], folder_of(name)
    meta = json.loads((folder / "meta.json").read_text())
    held = pickle.loads((folder / "held.pkl").read_bytes())
    names, ref = _outputs(folder / "fp32.onnx", held)
    res: dict = {}
    if "labels" in meta:
        res["fp32_label_accuracy"] = float(np.mean(ref[0].argmax(-1) == np.array(meta["labels"])))
    if "texts" in meta:
        res["fp32_text_accuracy"] = text_accuracy(ref[0], meta)
    for tool in tools:
        path = folder / f"{tool}.onnx"
        if not path.exists():
            continue
        r: dict = {}
        try:
            _, got = _outputs(path, held)
            r["metric"] = task_metric(g.task, ref, got, meta)
            r["sqnr_db"] = output_sqnr(ref, got, names)
            if "labels" in meta:
                r["label_accuracy"] = float(np.mean(got[0].argmax(-1) == np.array(meta["labels"])))
            if "texts" in meta:
                r["text_accuracy"] = text_accuracy(got[0], meta)
            r["float_left"] = len(cpu_kernels(onnx.load(str(path))).float_compute)
        except Exception as exc:  # a written model that does not run is a finding too
            r["eval_error"] = _internal(exc)
        res[tool] = r
    return res


def latency(name: str, tools: list[str], runs: int) -> dict:
    """fp32 and the tools' models that run, interleaved on the first held-out feed under the timing lock →
    {tool: int8/fp32 p50 ratio, "fp32_ms": …}."""
    from edgequant.bench import interleaved_latency

    folder = folder_of(name)
    feed = pickle.loads((folder / "held.pkl").read_bytes())[0]
    models = {"fp32": str(folder / "fp32.onnx"), **{t: str(folder / f"{t}.onnx") for t in tools}}
    with open("/tmp/eq-timing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lat = interleaved_latency(models, feed, runs=runs, warmup=3)
    return {"fp32_ms": round(lat["fp32"].p50_ms, 3),
            **{t: round(lat[t].p50_ms / lat["fp32"].p50_ms, 3) for t in tools}}


# ---------------------------------------------------------------- driver

def _sub(args: list[str], timeout: int, niced: bool = True) -> tuple[dict | None, str]:
    cmd = ["prlimit", f"--as={MEM_LIMIT}"] + (["nice", "-n", "15"] if niced else []) + [sys.executable, __file__]
    # one thread for torch's and numpy's pools outside the timing step: spinning OpenMP workers on a loaded
    # machine make an export many times slower
    env = os.environ if not niced else {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        p = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout} s"
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), ""
    tail = [s for s in p.stderr.strip().splitlines() if s.strip()] or [f"exit {p.returncode} (killed: memory?)"]
    return None, tail[-1][:300]


def _written(rec: dict, tool: str) -> bool:
    return rec["tools"].get(tool, {}).get("outcome") == "written"


def run_graph(name: str, tools: list[str], timeout: int, runs: int, fresh: bool) -> dict:
    """One graph end to end (cached steps skipped) → its record, also saved as ``record.json``."""
    folder = folder_of(name)
    rec_path = folder / "record.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {"name": name, "tools": {}}
    t0 = time.perf_counter()
    if not (folder / "held.pkl").exists():
        res, err = _sub(["--step", "prepare", "--graph", name], timeout)
        if res is None:
            rec["prepare_error"] = err
            folder.mkdir(parents=True, exist_ok=True)
            rec_path.write_text(json.dumps(rec, indent=1))
            return rec
    rec.pop("prepare_error", None)
    rec["meta"] = {k: v for k, v in json.loads((folder / "meta.json").read_text()).items()
                   if k not in ("characters", "labels", "texts")}
    for tool in tools:
        if tool in rec["tools"] and not fresh:
            continue
        (folder / f"{tool}.onnx").unlink(missing_ok=True)
        res, err = _sub(["--step", "tool", "--tool", tool, "--graph", name], timeout)
        rec["tools"][tool] = res or {"outcome": "internal error" if tool.startswith("edgequant") else "failed",
                                     "line": f"process ended: {err}"}
        rec_path.write_text(json.dumps(rec, indent=1))  # a run stopped later keeps this tool's result
    if fresh or "eval" not in rec or any(t not in rec["eval"] for t in rec["tools"] if _written(rec, t)):
        res, err = _sub(["--step", "eval", "--graph", name, "--tools", ",".join(rec["tools"])], timeout)
        rec["eval"] = res or {"error": err}
    runnable = [t for t in rec["tools"] if _written(rec, t) and "eval_error" not in rec["eval"].get(t, {})]
    if runs and runnable and (fresh or "latency" not in rec):
        res, err = _sub(["--step", "latency", "--graph", name, "--tools", ",".join(runnable), "--runs", str(runs)],
                        timeout, niced=False)
        rec["latency"] = res or {"error": err}
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec_path.write_text(json.dumps(rec, indent=1))
    return rec


def progress_line(i: int, n: int, rec: dict) -> str:
    parts = []
    for tool, r in rec.get("tools", {}).items():
        ev = rec.get("eval", {}).get(tool, {})
        m, lat = ev.get("metric"), rec.get("latency", {}).get(tool)
        parts.append(f"{tool} {r['outcome']}" + (" (does not run)" if "eval_error" in ev else "")
                     + (f" {m:.3f}" if isinstance(m, float) else "")
                     + (f" {min(ev['sqnr_db'].values()):.1f} dB" if ev.get("sqnr_db") else "")
                     + (f" {lat:.2f}x" if lat else ""))
    what = rec.get("prepare_error") or "; ".join(parts)
    return f"[{i}/{n}] {rec['name']}: {what} ({rec.get('seconds', 0):.0f} s)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated graph names")
    ap.add_argument("--source", help="comma-separated sources")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per step of one graph")
    ap.add_argument("--runs", type=int, default=10, help="interleaved latency runs (0: no latency)")
    ap.add_argument("--fresh", action="store_true", help="rerun the --tools on cached graphs (others are kept)")
    ap.add_argument("--write-docs", action="store_true", help="write docs/compatibility.md from the cached records")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--step", choices=("prepare", "tool", "eval", "latency"), help=argparse.SUPPRESS)
    ap.add_argument("--graph", help=argparse.SUPPRESS)
    ap.add_argument("--tool", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        import logging

        logging.disable(logging.WARNING)
        if args.step == "prepare":
            prepare(args.graph)
            out = {}
        elif args.step == "tool":
            out = run_tool(args.tool, args.graph)
        elif args.step == "eval":
            out = evaluate(args.graph, args.tools.split(","))
        else:
            out = latency(args.graph, args.tools.split(","), args.runs)
        print("RESULT " + json.dumps(out), flush=True)
        return
    from corpus_report import summary, write_docs
    from corpus_sources import graphs

    every = graphs()
    unknown = [n for n in (args.only or "").split(",") if n and n not in every]
    if unknown:
        sys.exit(f"error: no graph named {', '.join(unknown)} (see --list)")
    names = args.only.split(",") if args.only else list(every)  # --only runs in the order given
    names = [n for n in names if not args.source or every[n].source in args.source.split(",")]
    if args.list:
        print("\n".join(f"{n:45s} {every[n].source:14s} {every[n].task}" for n in names))
        return
    tools = args.tools.split(",")
    if args.write_docs and not (args.only or args.source):
        names = []  # the page alone, from the cached records
    for i, name in enumerate(names, 1):
        print(progress_line(i, len(names), run_graph(name, tools, args.timeout, args.runs, args.fresh)), flush=True)
    print(summary(every))
    if args.write_docs:
        path = write_docs(every)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
