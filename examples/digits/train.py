"""Train the digits CNN (seconds on a laptop CPU) and write its weights and calibration samples.

    python examples/digits/train.py

Writes `weights.pt`, `data/NNNN.npy` (300 pre-processed training samples, one per file, no batch axis) and
`images/NNN.png` (64 raw training digits as 8×8 grayscale PNGs, for the image-folder calibration path).
Deterministic: the same torch build on the same machine writes the same files.

`fit()` is the training recipe shared with `examples/digits_dw/train.py`; this file imports nothing from its
siblings at module level, so that example can import it by path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
NUM_CALIBRATION = 300
NUM_IMAGES = 64


def fit(make_model: Callable[[], nn.Module], x: np.ndarray, y: np.ndarray, *, epochs: int = 15,
        lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
        test_accuracy: Callable[[nn.Module], float] | None = None) -> nn.Module:
    """Seed, build the model, train it with Adam and a cosine schedule; print loss (and test accuracy) per epoch.

    The seed is set before `make_model()` so that the initial weights are reproducible too; one thread makes the
    result independent of the core count (and is the fastest for models this small).
    """
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    model = make_model()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        total = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        line = f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(xt):.4f}"
        if test_accuracy is not None:
            line += f"  test acc {test_accuracy(model.eval()):.2f}%"
        print(line, flush=True)
    return model.eval()


def write_samples(x_train: np.ndarray, raw_train: np.ndarray) -> None:
    """data/NNNN.npy: the first 300 pre-processed training samples after a seeded shuffle; images/NNN.png: the
    first 64 of the same order as raw 8×8 PNGs (pixel = digit value × 16, clipped to 255)."""
    from PIL import Image

    order = np.random.default_rng(0).permutation(len(x_train))
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    for i, j in enumerate(order[:NUM_CALIBRATION]):
        np.save(data / f"{i:04d}.npy", x_train[j])
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    for i, j in enumerate(order[:NUM_IMAGES]):
        pixels = np.clip(raw_train[j] * 16, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i:03d}.png")


def main() -> None:
    # Imported here, not at module level: run as a script, this folder is first on sys.path.
    from evaluate import accuracy, torch_runner
    from model import DigitsCNN, load_raw_split, preprocess

    raw_tr, y_tr, raw_te, y_te = load_raw_split()
    x_tr, x_te = preprocess(raw_tr), preprocess(raw_te)
    start = time.perf_counter()
    model = fit(DigitsCNN, x_tr, y_tr, epochs=15,
                test_accuracy=lambda m: accuracy(torch_runner(m), x_te, y_te))
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), HERE / "weights.pt")
    write_samples(x_tr, raw_tr)
    print(f"fp32 test accuracy {accuracy(torch_runner(model), x_te, y_te):.2f}% (trained in {seconds:.1f} s); "
          f"wrote weights.pt, data/ ({NUM_CALIBRATION}), images/ ({NUM_IMAGES})")


if __name__ == "__main__":
    main()
