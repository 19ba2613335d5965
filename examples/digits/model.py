"""A small CNN for scikit-learn's bundled 8×8 digits images, and the data split it was trained on.

`build()` is the factory `edgequant export` calls: it returns the trained model with its weights loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
# Pixel statistics of the training split after scaling to [0, 1]; fixed so that device and host agree.
MEAN = 0.3052
STD = 0.3760


class DigitsCNN(nn.Module):
    """1×8×8 image → 10 logits: three Conv+BN+ReLU blocks, global average pooling, a Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def build() -> nn.Module:
    """The trained DigitsCNN in eval mode."""
    model = DigitsCNN()
    model.load_state_dict(torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval()


def preprocess(images: np.ndarray) -> np.ndarray:
    """Digits pixels (N, 8, 8) in 0..16 → float32 model input (N, 1, 8, 8): x = (p / 16 - MEAN) / STD."""
    x = np.asarray(images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    return ((x - MEAN) / STD).astype(np.float32)


def load_raw_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/test split (75/25, stratified, seed 0) of the raw digits (N, 8, 8), pixels 0..16, and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.images, digits.target, test_size=0.25, random_state=0,
                                              stratify=digits.target)
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split, pre-processed → x_train (N, 1, 8, 8) float32, y_train, x_test, y_test (int64)."""
    x_tr, y_tr, x_te, y_te = load_raw_split()
    return preprocess(x_tr), y_tr, preprocess(x_te), y_te
