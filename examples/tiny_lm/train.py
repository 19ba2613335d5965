"""Train the tiny byte-level language model on the Python reference manual and write its weights.

    python examples/tiny_lm/train.py

Writes `weights.pt` (float16 state dict, ~5 MB) and `calibration.npy` (64 training windows of 128 byte ids,
int64, for `edgequant export --calibrate`). Deterministic for a given torch build and thread count (two
threads here); takes about 15 minutes on two busy CPU cores. Prints the held-out perplexity at the end.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import model as lm  # noqa: E402

STEPS = 350
BATCH = 24
LR = 3e-3
WARMUP = 20
NUM_CALIBRATION = 64
THREADS = 2


def main() -> None:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train, held = lm.load_text()
    net = lm.TinyLM()
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
    t0 = time.perf_counter()
    net.train()
    for step in range(STEPS):
        starts = rng.integers(0, len(train) - lm.SEQ - 1, size=BATCH)
        chunk = torch.from_numpy(np.stack([train[s:s + lm.SEQ + 1] for s in starts]))
        logits = net(chunk[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, lm.VOCAB), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == STEPS - 1:
            print(f"step {step:4d}/{STEPS}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s", flush=True)
    net.eval()
    state = {k: v.detach().half() for k, v in net.state_dict().items()}
    torch.save(state, HERE / "weights.pt")
    np.save(HERE / "calibration.npy", lm.windows(train[len(train) // 2:], NUM_CALIBRATION))

    model = lm.build()
    with torch.no_grad():
        ppl = lm.perplexity(lambda b: model(torch.from_numpy(b)).numpy(), lm.windows(held))
    print(f"held-out perplexity {ppl:.3f} ({len(held)} bytes)")


if __name__ == "__main__":
    main()
