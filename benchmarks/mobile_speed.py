"""int8/fp32 latency of mobile networks and where the int8 time goes (``pip install -e .[zoo]``).

    python benchmarks/mobile_speed.py [--only mobilenet_v3_large,efficientnet_lite0] [--runs 60]

Per model: edgequant's generic-cpu graph (64 calibration crops) against fp32, batch 1, one thread, interleaved
(edgequant.bench.interleaved_latency); then the graph with each of the profile's kernel choices undone —
depthwise convolutions left at channel counts MLAS's fast int8 kernels refuse (``depthwise_channel_align``),
the RGB input left at 3 channels (``input_channel_align``), HardSigmoid left float between Q/DQ
(``int8_hardsigmoid``), none of the three — and with one pattern class kept float
at a time — squeeze-excitation blocks, hard-swish (HardSigmoid·x), depthwise convolutions — so that each
choice is measured, not assumed; then ONNX Runtime's profile of the int8 and fp32 graphs by op type. The CPU features
are printed; on an x86 host with VNNI, AVX2-only figures need ``qemu-x86_64-static -cpu Haswell``, whose
timings mean nothing (emulation), so latency is measured on the host.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _patterns(model) -> dict[str, list[str]]:
    """Node names per pattern class: SE blocks, hard-swish pairs, depthwise convolutions."""
    prod = {o: n for n in model.graph.node for o in n.output}
    users = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            users[i].append(n)
    hswish = set()
    for n in model.graph.node:
        if n.op_type == "Mul":
            hs = [prod.get(i) for i in n.input if prod.get(i) is not None and prod[i].op_type == "HardSigmoid"]
            if hs and hs[0].input[0] in n.input:
                hswish |= {n.name, hs[0].name}
    se = set()
    for n in model.graph.node:
        if n.op_type in ("HardSigmoid", "Sigmoid") and n.name not in hswish:
            chain, cur = [n.name], prod.get(n.input[0])
            while cur is not None and cur.op_type != "GlobalAveragePool" and len(chain) < 8:
                chain.append(cur.name)
                cur = prod.get(cur.input[0])
            if cur is not None and cur.op_type == "GlobalAveragePool":
                se |= set(chain) | {cur.name} | {u.name for u in users[n.output[0]] if u.op_type == "Mul"}
    dw = {n.name for n in model.graph.node if n.op_type == "Conv"
          and any(a.name == "group" and a.i > 1 for a in n.attribute)}
    return {"SE blocks": sorted(se), "hard-swish": sorted(hswish), "depthwise conv": sorted(dw)}


def _profile(model, x: dict, runs: int = 20) -> dict[str, float]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, x)
        events = json.load(open(s.end_profiling()))
    agg = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            agg[e["args"]["op_name"]] += e["dur"] / runs / 1000
    return dict(agg.most_common())


def run(name: str, runs: int) -> dict:
    import onnx

    import edgequant
    from edgequant.bench import interleaved_latency
    from edgequant.calibration.streaming import calibrate, tensors_to_calibrate
    from edgequant.frontend.torch_export import prepare_fp32
    from edgequant.quantize.hardsigmoid import int8_hardsigmoid
    from edgequant.quantize.qdq import quantize
    from edgequant.targets import load_target
    from edgequant.transforms.channel_pad import pad_depthwise_channels, pad_input_channels
    from zoo_models import crops, efficientnet_lite0, torchvision_model

    model = efficientnet_lite0() if name == "efficientnet_lite0" else torchvision_model(name, 224)
    data = crops(80, 224, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        b = edgequant.export(model, [d for d in data], out=Path(tmp) / "b", progress=False, layer_report=False)
        fp32, int8 = onnx.load(str(b.fp32_model_path)), onnx.load(str(b.model_path))
    tgt = load_target("generic-cpu")
    inp = fp32.graph.input[0].name
    samples = [{inp: d} for d in data[:32]]
    base = prepare_fp32(fp32)
    qs = tgt.quantization
    dw, info = pad_depthwise_channels(base, qs.depthwise_channel_align)
    rgb, _ = pad_input_channels(base, qs.input_channel_align, spread=qs.pair_saturation)
    padded, inputs = pad_input_channels(dw, qs.input_channel_align, spread=qs.pair_saturation)

    def q(graph, hsig: bool, exclude=()):
        ranges = calibrate(graph, samples, tensors_to_calibrate(graph, tgt.quantization.op_types), batch_size=8)
        out = quantize(graph, ranges, tgt, exclude_nodes=list(exclude))
        if hsig:
            int8_hardsigmoid(out)
        return out

    # the export's own graph, then each of its two kernel choices undone, then one pattern class kept float
    variants = {"fp32": fp32, "edgequant": int8,
                "depthwise unpadded": q(rgb, True), "RGB input unpadded": q(dw, True),
                "HardSigmoid float": q(padded, False), "none of the three": q(base, False)}
    pats = _patterns(padded)
    for label, nodes in pats.items():
        if nodes:
            variants[f"{label} float"] = q(padded, True, nodes)
    x = {inp: data[:1]}
    lat = interleaved_latency(variants, x, runs=runs, warmup=5)
    base_ms = lat["fp32"].p50_ms
    return {"model": name, "fp32_ms": round(base_ms, 3),
            "ratios": {k: round(v.p50_ms / base_ms, 3) for k, v in lat.items() if k != "fp32"},
            "spread": {k: round(v.spread, 3) for k, v in lat.items()},
            "padded_depthwise": [(i["channels"], i["padded"]) for i in info],
            "padded_inputs": [(i["channels"], i["padded"]) for i in inputs],
            "pattern_nodes": {k: len(v) for k, v in pats.items()},
            "profile_int8_ms": {k: round(v, 3) for k, v in _profile(int8, x).items()},
            "profile_fp32_ms": {k: round(v, 3) for k, v in _profile(fp32, x).items()}}


def main() -> None:
    from mobile_accuracy import cpu_features

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="mobilenet_v3_large,efficientnet_lite0")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args()
    goals = {"mobilenet_v3_large": 0.75, "efficientnet_lite0": 0.60}
    out = []
    print(f"host CPU features: {cpu_features()}; batch 1, one thread, interleaved, p50")
    for name in args.only.split(","):
        r = run(name, args.runs)
        out.append(r)
        goal = goals.get(name)
        print(f"\n{name}: fp32 {r['fp32_ms']:.2f} ms; int8/fp32 {r['ratios']['edgequant']:.3f}"
              + (f" (goal <= {goal})" if goal else ""))
        print(f"  padded (channels -> padded): depthwise {r['padded_depthwise']}, inputs {r['padded_inputs']}")
        for k, v in r["ratios"].items():
            if k != "edgequant":
                nodes = r["pattern_nodes"].get(k[:-6])
                print(f"  variant {k:22s} {v:.3f}" + (f"  ({nodes} nodes)" if nodes is not None else ""))
        print("  latency spread (p90-p50)/p50: " + ", ".join(f"{k} {v:.3f}" for k, v in r["spread"].items()))
        tot = sum(r["profile_int8_ms"].values())
        print("  int8 profile: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / tot:.0f}%)"
                                             for k, v in list(r["profile_int8_ms"].items())[:7]))
        tot = sum(r["profile_fp32_ms"].values())
        print("  fp32 profile: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / tot:.0f}%)"
                                             for k, v in list(r["profile_fp32_ms"].items())[:5]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
