"""Decoding speed and memory of weight-only presets on a decoder large enough to be memory-bound.

A Llama-shaped model (about 125 M parameters: width 768, 12 layers, 12 query and 4 key/value heads, MLP 2048,
vocabulary 32000, untied head; or ``--shape gpt2``: GPT-2 small, 124 M) is built from its config with random
weights (speed does not depend on the values; nothing is downloaded), exported through the decoder job's
stages (optimum's ``text-generation-with-past`` graph, ONNX Runtime's basic optimizations), and quantized to
q8, q4 and q4-gptq (GPTQ's Hessians from random token sequences). Every graph then generates through the
device's generator with its key/value cache: a 128-token prompt, then 64 tokens one by one, interleaved, at
one and two threads; peak memory is measured in a fresh process per model.

    nice -n 10 python benchmarks/decoder_speed.py [--shape llama|gpt2] [--threads 1,2] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgequant.bench_generation import bench_generation, format_generation
from edgequant.frontend.hf import load_hf, read_decoder_config
from edgequant.frontend.torch_export import prepare_fp32
from edgequant.jobs.decoder import ACCURACY_LEVEL, TASK, first_step_sample, generation_spec
from edgequant.quantize.weight_only import WeightOnly, quantize_weights, weight_bytes


def build_model(folder: Path, shape: str) -> None:
    """A decoder model folder with random weights, a small tokenizer and a generation config."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)

    torch.manual_seed(0)
    if shape == "gpt2":
        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 768 wide, 12 layers, 50257 tokens, tied head
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                             num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                             max_position_embeddings=2048, tie_word_embeddings=False))
    model.eval().save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the robot picks up the cube"], trainers.BpeTrainer(vocab_size=300,
                                                                                  special_tokens=["</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(folder)
    GenerationConfig(eos_token_id=0).save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"model    {shape}-shaped, {n / 1e6:.1f} M parameters, random weights", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--presets", default="q8,q4,q4-gptq")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgequant-decoder-") as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model", args.shape)
        config, gen_config = read_decoder_config(tmp / "model")
        t = time.perf_counter()
        hf = load_hf(tmp / "model", task=TASK, opset=18)
        fp32 = prepare_fp32(hf.onnx_model)
        del hf
        spec = generation_spec(fp32, config, gen_config, "model")
        print(f"export   {time.perf_counter() - t:.0f} s", flush=True)
        paths = {"fp32": tmp / "fp32.onnx"}
        paths["fp32"].write_bytes(fp32.SerializeToString())
        rng = np.random.default_rng(1)
        calib = [first_step_sample(fp32, spec, rng.integers(1, 32000, 128).tolist()) for _ in range(8)]
        sizes = {}
        for preset in args.presets.split(","):
            t = time.perf_counter()
            q = quantize_weights(fp32, WeightOnly(preset, block_size=args.block_size, accuracy_level=ACCURACY_LEVEL),
                                 calib if preset.endswith("gptq") else None, batch_size=1, progress=False)
            sizes[preset] = weight_bytes(q)
            paths[preset] = tmp / f"{preset}.onnx"
            paths[preset].write_bytes(q.SerializeToString())
            del q
            print(f"quantize {preset}: {time.perf_counter() - t:.0f} s, MatMul weights "
                  f"{100 * sizes[preset]['ratio']:.1f}% of float32", flush=True)
        del fp32, calib
        result = bench_generation(paths, spec, name=f"{args.shape}-shaped decoder",
                                  threads=tuple(int(v) for v in args.threads.split(",")),
                                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs).to_dict()
        result["weights"] = sizes
        result["files_mib"] = {k: round(p.stat().st_size / 2 ** 20, 1) for k, p in paths.items()}
    print(format_generation(result))
    print("files    " + ", ".join(f"{k} {v} MiB" for k, v in result["files_mib"].items()))
    print("cpu      ONNX Runtime picks its MatMulNBits kernels from the CPU's features (machine line)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
