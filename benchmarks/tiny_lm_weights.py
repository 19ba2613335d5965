"""Weight-only presets on the tiny byte-level language model (examples/tiny_lm), in one run.

Rows: fp32, q8, q4 (round to nearest) and q4-gptq at each block size. Columns: perplexity on the held-out
Python reference manual text (all non-overlapping 128-byte windows), relative to fp32; the mean per-byte KL
divergence of the next-byte distribution from fp32's (a finer measure than perplexity, whose small changes
can go either way); greedy generation against fp32's: 64 bytes greedily decoded after the first 64 bytes of
16 held-out windows, as the fraction of positions with the same byte ("greedy") and the fraction before the
first difference ("prefix"; the causal model reads its 128-byte window, position t sees only bytes ≤ t); bytes of the MatMul weights relative to float32; the time to quantize; and batch-1
latency (128 tokens) on one thread relative to fp32 (all models interleaved in one run).

    python benchmarks/tiny_lm_weights.py [--block-sizes 32,64,128] [--calibration 64] [--runs 40] [--accuracy-level 4]
                                         [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GREEDY = 64  # bytes of prompt, then bytes generated
TINY_LM = ROOT / "examples" / "tiny_lm"

from edgequant.bench import interleaved_latency  # noqa: E402
from edgequant.frontend.torch_export import prepare_fp32, to_onnx  # noqa: E402
from edgequant.check.fidelity import session  # noqa: E402
from edgequant.quantize.weight_only import WeightOnly, quantize_weights, weight_bytes  # noqa: E402


def _example():
    spec = importlib.util.spec_from_file_location("tiny_lm_model", TINY_LM / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-sizes", default="32,64,128")
    ap.add_argument("--calibration", type=int, default=64, help="training windows for GPTQ")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--accuracy-level", type=int, default=0, help="MatMulNBits accuracy_level: 0 float "
                    "activations, 4 int8 activation blocks (what decoder bundles use)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    lm = _example()
    _, held = lm.load_text()
    ids = lm.windows(held)
    calib = [{"input_ids": w} for w in np.load(TINY_LM / "calibration.npy")[:args.calibration]]
    fp32 = prepare_fp32(to_onnx(lm.build(), {"input_ids": np.zeros(lm.SEQ, np.int64)}, opset=18))

    def logp(model):
        s = session(model)
        return lm.log_probs(lambda b: s.run(None, {"input_ids": b})[0], ids)

    def ppl(lp):
        return float(np.exp(-np.take_along_axis(lp[:, :-1], ids[:, 1:, None], axis=-1).mean()))

    prompts = ids[::max(1, len(ids) // 16)][:16, :GREEDY]

    def greedy(model):
        s = session(model)
        window = np.zeros((len(prompts), lm.SEQ), dtype=np.int64)
        window[:, :GREEDY] = prompts
        for t in range(GREEDY, lm.SEQ):
            window[:, t] = s.run(None, {"input_ids": window})[0][:, t - 1].argmax(-1)
        return window[:, GREEDY:]

    def agreement(a, b):
        same = a == b
        prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1)) / same.shape[1]
        return float(same.mean()), float(prefix.mean())

    ref = logp(fp32)
    ref_greedy = greedy(fp32)
    rows = [{"preset": "fp32", "block_size": None, "perplexity": ppl(ref), "kl": 0.0, "weight_ratio": 1.0,
             "greedy_match": 1.0, "greedy_prefix": 1.0,
             "quantize_s": 0.0}]
    models = {"fp32": fp32}
    for bs in (int(b) for b in args.block_sizes.split(",")):
        for preset in ("q8", "q4", "q4-gptq"):
            t = time.perf_counter()
            q = quantize_weights(fp32, WeightOnly(preset, block_size=bs, accuracy_level=args.accuracy_level), calib, progress=True)
            took = time.perf_counter() - t
            sizes = weight_bytes(q)
            lp = logp(q)
            match, prefix = agreement(ref_greedy, greedy(q))
            rows.append({"preset": preset, "block_size": bs, "perplexity": ppl(lp), "kl": lm.kl_divergence(ref, lp),
                         "greedy_match": match, "greedy_prefix": prefix,
                         "weight_ratio": sizes["ratio"],
                         "weight_bytes": sizes["quantized_bytes"], "fp32_weight_bytes": sizes["fp32_bytes"],
                         "quantize_s": took})
            models[f"{preset}/{bs}"] = q
    lat = interleaved_latency(models, {"input_ids": ids[:1]}, threads=1, runs=args.runs)
    base = rows[0]["perplexity"]
    print(f"held-out: {ids.size} bytes in {len(ids)} windows; GPTQ calibration: {len(calib)} windows of {lm.SEQ}")
    print(f"MatMulNBits accuracy_level {args.accuracy_level}")
    print(f"greedy: {GREEDY} bytes after {GREEDY}-byte prompts from {len(prompts)} held-out windows")
    print(f"{'preset':<9} {'block':>5} {'perplexity':>10} {'vs fp32':>8} {'KL nats':>8} {'greedy':>7} {'prefix':>7} "
          f"{'weights':>8} {'quantize':>9} {'latency':>8}")
    for r in rows:
        key = r["preset"] if r["block_size"] is None else f"{r['preset']}/{r['block_size']}"
        r["latency_ratio"] = lat[key].p50_ms / lat["fp32"].p50_ms
        print(f"{r['preset']:<9} {r['block_size'] or '-':>5} {r['perplexity']:>10.4f} "
              f"{100 * (r['perplexity'] / base - 1):>+7.2f}% {r['kl']:>8.5f} {100 * r['greedy_match']:>6.1f}% "
              f"{100 * r['greedy_prefix']:>6.1f}% {100 * r['weight_ratio']:>7.2f}% "
              f"{r['quantize_s']:>8.1f}s {r['latency_ratio']:>7.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
