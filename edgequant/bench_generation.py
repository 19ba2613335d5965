"""Generation speed of decoder models: prompt processing, per-token latency, tokens/s and peak memory, for a
decoder bundle's fp32 and quantized graphs (``edgequant bench BUNDLE``) or any set of decoder graphs of the
same model (benchmarks/decoder_speed.py).

Each round runs every model once, in alternating order (as ``bench.interleaved_times``), through the device's
own generator (``edgequant_generate.Generator``: the code in the bundle, key/value cache and all): a prompt of
``prompt_tokens`` random token ids in one step, then ``new_tokens`` greedy steps of one token each, with the
end-of-sequence tokens ignored so that every run decodes the same number of tokens. Reported per model: the
median prompt step (ms), the median decode step (ms per token), tokens/s = 1000 / that median, and the peak
resident memory that loading the model and generating adds to a fresh process (``_memprobe.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BenchError

__all__ = ["GenerationBench", "bench_generation", "format_generation", "generation_peak_mib", "generation_times"]


class _NoText:
    """A stand-in tokenizer: the benchmark feeds token ids and never reads the text."""

    def decode(self, ids, skip_special_tokens=True):  # noqa: ARG002
        return ""


@dataclass(frozen=True)
class GenerationBench:
    """Rows (one per model × threads), the settings and the machine."""

    name: str
    prompt_tokens: int
    new_tokens: int
    runs: int
    rows: tuple[dict, ...]
    environment: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": "generation", "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "runs": self.runs, "environment": self.environment,
                "rows": list(self.rows)}


def _generator(path: str | Path, spec: Mapping, threads: int):
    import onnxruntime as ort

    from ._runtime.edgequant_generate import Generator

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if threads == 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Generator(session, "", {"generation": {**spec, "eos_token_ids": []}}, tokenizer=_NoText())


def generation_times(models: Mapping[str, str | Path], spec: Mapping, *, threads: int = 1, prompt_tokens: int = 128,
                     new_tokens: int = 64, runs: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, dict]:
    """Decoder graphs (name → .onnx path) + the manifest's ``generation`` entry → {name: {"prompt_ms": [...],
    "token_ms": [...]}} over ``runs`` interleaved rounds (warm-up rounds excluded)."""
    if prompt_tokens + new_tokens > int(spec["context"]):
        raise BenchError(f"{prompt_tokens} prompt + {new_tokens} new tokens do not fit the model's context of "
                         f"{spec['context']}: lower --prompt-tokens or --new-tokens")
    gens = {name: _generator(path, spec, threads) for name, path in models.items()}
    vocab = 100
    prompt = np.random.default_rng(seed).integers(1, vocab, prompt_tokens).tolist()
    out = {name: {"prompt_ms": [], "token_ms": []} for name in gens}
    for r in range(warmup + runs):
        order = list(gens.items()) if r % 2 == 0 else list(gens.items())[::-1]
        for name, gen in order:
            res = gen.generate(prompt, new_tokens, do_sample=False)
            if r >= warmup:
                out[name]["prompt_ms"].append(1e3 * res.prompt_s)
                out[name]["token_ms"].extend(1e3 * t for t in res.step_s[1:])
    return out


def generation_peak_mib(path: str | Path, spec: Mapping, *, prompt_tokens: int = 128, new_tokens: int = 64) -> float:
    """Peak resident memory (MiB) that loading the decoder at ``path`` and generating adds to a fresh process."""
    from ._runtime import edgequant_generate

    probe = {"model": str(path), "provider": "CPUExecutionProvider", "runs": 1, "inputs": {},
             "generation": {"spec": {**spec, "eos_token_ids": []}, "module": edgequant_generate.__file__,
                            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_memprobe.py")), json.dumps(probe)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{path}: the memory probe failed: {last}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return round((out["peak_kib"] - out["baseline_kib"]) / 1024, 2)


def bench_generation(models: Mapping[str, str | Path], spec: Mapping, *, name: str, threads: Sequence[int] = (1,),
                     prompt_tokens: int = 128, new_tokens: int = 64, runs: int = 3, warmup: int = 1,
                     memory: bool = True) -> GenerationBench:
    """Decoder graphs of one model (name → path) → prompt latency, per-token latency, tokens/s and peak memory
    per model and thread count (see the module's docstring)."""
    from .bench import environment

    if runs < 1 or warmup < 0 or prompt_tokens < 1 or new_tokens < 2:
        raise BenchError("runs, prompt tokens and new tokens must be at least 1, 1 and 2")
    rows = []
    for t in threads:
        times = generation_times(models, spec, threads=t, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                 runs=runs, warmup=warmup)
        for m, ts in times.items():
            token_ms = float(np.median(ts["token_ms"]))
            rows.append({"model": m, "threads": t, "prompt_ms": round(float(np.median(ts["prompt_ms"])), 3),
                         "token_ms": round(token_ms, 4), "token_ms_p90": round(float(np.percentile(ts["token_ms"], 90)),
                                                                              4),
                         "tokens_per_s": round(1e3 / token_ms, 2)})
    if memory:
        for m, path in models.items():
            peak = generation_peak_mib(path, spec, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
            for r in rows:
                if r["model"] == m:
                    r["peak_memory_mib"] = peak
    return GenerationBench(name, prompt_tokens, new_tokens, runs, tuple(rows), environment())


def format_generation(result: Mapping) -> str:
    """A generation bench (``GenerationBench.to_dict()``) → a terminal table, each model against the first."""
    head = (f"{'model':<9} {'threads':>7} {'prompt ms':>10} {'ms/token':>9} {'p90':>8} {'tokens/s':>9} "
            f"{'vs ' + result['rows'][0]['model']:>9} {'peak MiB':>9} {'memory':>7}")
    lines = [f"generate {result['name']}  ({result['prompt_tokens']}-token prompt, then {result['new_tokens']} "
             f"tokens one by one; {result['runs']} interleaved runs each, batch 1)", head, "-" * len(head)]
    base = {r["threads"]: r for r in result["rows"] if r["model"] == result["rows"][0]["model"]}
    for r in result["rows"]:
        b = base[r["threads"]]
        mem = f"{r['peak_memory_mib']:>9.1f} {100 * r['peak_memory_mib'] / b['peak_memory_mib']:>6.1f}%" \
            if "peak_memory_mib" in r and b.get("peak_memory_mib") else f"{'-':>9} {'-':>7}"
        lines.append(f"{r['model']:<9} {r['threads']:>7} {r['prompt_ms']:>10.2f} {r['token_ms']:>9.3f} "
                     f"{r['token_ms_p90']:>8.3f} {r['tokens_per_s']:>9.1f} "
                     f"{r['tokens_per_s'] / b['tokens_per_s']:>8.2f}x {mem}")
    env = result.get("environment") or {}
    lines.append(f"machine  {env.get('cpu', '?')} ({env.get('cpu_features', '?')}), onnxruntime {env.get('onnxruntime', '?')}, load average "
                 f"{env.get('load_average')}")
    return "\n".join(lines)
