"""A MobileNet-style CNN (depthwise-separable convolutions, ReLU6) for the 8×8 digits, on the same data as
`examples/digits`.

`build()` is the factory `edgequant export` calls. The data split, pre-processing and calibration samples are
those of `examples/digits` (its `model.py` is imported by path: both examples have a `model.py`, so it cannot go
through `sys.path`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DIGITS = HERE.parent / "digits"


def import_digits(name: str) -> ModuleType:
    """`examples/digits/<name>.py` as a module, imported by path under a name of its own (once per process)."""
    key = f"_examples_digits_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, DIGITS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_digits = import_digits("model")
MEAN, STD = _digits.MEAN, _digits.STD
preprocess, load_raw_split, load_split = _digits.preprocess, _digits.load_raw_split, _digits.load_split


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU6."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3×3 (groups = channels) + BN + ReLU6, then pointwise 1×1 + BN + ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1))


class DigitsDW(nn.Module):
    """1×8×8 image → 10 logits: a 3×3 stem, four depthwise-separable blocks (8×8 → 4×4 at the second), global
    average pooling, a Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32, 3),
            DepthwiseSeparable(32, 64),
            DepthwiseSeparable(64, 64, stride=2),
            DepthwiseSeparable(64, 96),
            DepthwiseSeparable(96, 128),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def build() -> nn.Module:
    """The trained DigitsDW in eval mode."""
    model = DigitsDW()
    model.load_state_dict(torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval()
