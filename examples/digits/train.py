"""Train the digits CNN (seconds on a laptop CPU) and write its weights and calibration samples.

    python examples/digits/train.py

Writes `weights.pt`, `data/NNNN.npy` (300 pre-processed training samples, one per file, no batch axis) and
`images/NNN.png` (64 raw training digits as 8×8 grayscale PNGs, for the image-folder calibration path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import HERE, DigitsCNN, load_split  # noqa: E402


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
          epochs: int = 15, seed: int = 0) -> nn.Module:
    """Adam, batch 64, cosine schedule; prints loss and test accuracy per epoch."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        total = 0.0
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(xt):.4f}  test acc {accuracy(model, x_test, y_test):.2f}%")
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() * 100)


def main() -> None:
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_te, y_te = load_split()
    model = train(DigitsCNN(), x_tr, y_tr, x_te, y_te)
    torch.save(model.state_dict(), HERE / "weights.pt")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_tr))
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    for i, j in enumerate(order[:300]):
        np.save(data / f"{i:04d}.npy", x_tr[j])
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    raw_tr = train_test_split(digits.images, digits.target, test_size=0.25, random_state=0,
                              stratify=digits.target)[0]
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    for i, j in enumerate(order[:64]):
        Image.fromarray(np.clip(raw_tr[j] * 16, 0, 255).astype(np.uint8), mode="L").save(images / f"{i:03d}.png")
    print(f"fp32 test accuracy {accuracy(model, x_te, y_te):.2f}%; wrote weights.pt, data/ (300), images/ (64)")


if __name__ == "__main__":
    main()
