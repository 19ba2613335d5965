"""The check of a quantized decoder against its fp32 graph, on held-out text, the way the device runs it.

Two measures, both through ONNX Runtime with the decoder's key/value-cache graph:

- next-token distributions over whole held-out texts (one step with an empty cache): the perplexity of each
  model, exp(-mean log p(x_{t+1} | x_≤t)), the mean KL divergence KL(p_fp32 ‖ p_q) per position (in nats;
  finer than perplexity, whose small changes can go either way) and the top-1 agreement of the next token;
- greedy generation from the first half of each held-out text, ``new_tokens`` tokens, with the device's own
  generator (``edgequant_generate.Generator``, the code in the bundle): ``greedy_match`` is the fraction of
  positions where both produced the same token, ``greedy_prefix`` the fraction before the first divergence
  (after which the two continue from different text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

__all__ = ["decoder_agreement", "next_token_logits"]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def next_token_logits(gen: Any, ids: Sequence[int]) -> np.ndarray:
    """A device generator + token ids → (T, vocab) logits of one step with an empty cache."""
    feed = gen.feed(np.asarray(ids, dtype=np.int64), 0, gen.empty_cache())
    return gen.session.run([gen.spec["logits"]], feed)[0][0]


def decoder_agreement(fp32: onnx.ModelProto, quantized: onnx.ModelProto, token_ids: Sequence[Sequence[int]],
                      spec: Mapping[str, Any], tokenizer: Any, *, new_tokens: int = 32) -> dict[str, Any]:
    """Both decoder graphs + held-out token sequences + the manifest's ``generation`` entry and a ``tokenizers``
    Tokenizer → perplexities, KL, next-token and greedy agreement (see the module's docstring)."""
    from .._runtime.edgequant_generate import Generator
    from ..graph.sessions import session

    gens = [Generator(session(m), "", {"generation": spec}, tokenizer=tokenizer) for m in (fp32, quantized)]
    nll = [[], []]
    kl, top1, match, prefix, tokens = [], [], [], [], 0
    for ids in token_ids:
        ids = list(ids)[:gens[0].context]
        if len(ids) < 2:
            continue
        lp = [_log_softmax(next_token_logits(g, ids)) for g in gens]
        target = np.asarray(ids[1:])
        for i in range(2):
            nll[i].append(-lp[i][np.arange(len(target)), target])
        kl.append((np.exp(lp[0]) * (lp[0] - lp[1])).sum(axis=-1))
        top1.append(lp[0].argmax(-1) == lp[1].argmax(-1))
        tokens += len(ids)
        n = max(1, min(len(ids) // 2, gens[0].context - new_tokens - 1))
        if n < 1:
            continue
        outs = [g.generate(ids[:n], new_tokens, do_sample=False).token_ids for g in gens]
        length = max(len(outs[0]), len(outs[1]), 1)
        a, b = (o + [-1] * (length - len(o)) for o in outs)
        same = np.asarray(a) == np.asarray(b)
        match.append(float(same.mean()))
        prefix.append(float(np.argmin(same) if not same.all() else length) / length)
    if not kl:
        return {"samples": 0}
    ppl = [float(np.exp(np.concatenate(v).mean())) for v in nll]
    return {
        "samples": len(kl),
        "tokens": tokens,
        "perplexity_fp32": ppl[0],
        "perplexity": ppl[1],
        "kl_nats": float(np.concatenate(kl).mean()),
        "next_token_agreement": float(np.concatenate(top1).mean()),
        "greedy_tokens": new_tokens,
        "greedy_match": float(np.mean(match)) if match else None,
        "greedy_prefix": float(np.mean(prefix)) if prefix else None,
    }
