"""A tiny anchor-free detector in the YOLOv8 style (DFL box branch + sigmoid class scores, one Concat
output), and the generated data it learns: coloured squares, discs and triangles on noisy gradient
backgrounds, 64×64 RGB. No download; the generator is seeded.

Output of the exported model: (N, 4 + 3, 64): for each cell of the 8×8 grid (stride 8), box centre x, y,
width, height in input pixels, then the scores of the classes square, disc, triangle (0–1). The device
decodes it with the bundle's ``edgequant_detect.py`` (score ≥ 0.25, class-aware NMS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SIZE, STRIDE, REG_MAX = 64, 8, 8
GRID = SIZE // STRIDE
CLASSES = ("square", "disc", "triangle")


def _block(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class TinyDetector(nn.Module):
    """Backbone of four conv blocks to an 8×8 grid; box branch: 4 sides × ``REG_MAX`` bins (Distribution Focal
    Loss), decoded by softmax and a fixed 0..REG_MAX-1 convolution; class branch: 3 logits → sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(3, 16, 2), _block(16, 32, 2), _block(32, 64, 2), _block(64, 64))
        self.box = nn.Sequential(_block(64, 64), nn.Conv2d(64, 4 * REG_MAX, 1))
        self.cls = nn.Sequential(_block(64, 64), nn.Conv2d(64, len(CLASSES), 1))
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False)
        self.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)
        self.dfl.weight.requires_grad_(False)
        ys, xs = torch.meshgrid(torch.arange(GRID) + 0.5, torch.arange(GRID) + 0.5, indexing="ij")
        self.register_buffer("anchors", torch.stack([xs.flatten(), ys.flatten()]).unsqueeze(0), persistent=False)
        nn.init.constant_(self.cls[-1].bias, -4.0)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → (box logits (N, 4, REG_MAX, cells), class logits (N, 3, cells)), for training."""
        f = self.body(x)
        n = x.shape[0]
        return self.box(f).view(n, 4, REG_MAX, GRID * GRID), self.cls(f).view(n, len(CLASSES), GRID * GRID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, cls = self.raw(x)
        dist = self.dfl(box.transpose(2, 1).softmax(1)).view(-1, 4, GRID * GRID)  # expected bin per side
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * STRIDE
        return torch.cat((xywh, cls.sigmoid()), 1)


def build() -> TinyDetector:
    """The trained detector (weights.pt, written by train.py), in eval mode: the factory `edgequant export` calls."""
    model = TinyDetector()
    model.load_state_dict(torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval()


def generate(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` images (n, 3, 64, 64) float32 in 0–1 and, per image, its boxes (k, 5): x1, y1, x2, y2, class."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, SIZE, SIZE), np.float32)
    boxes = []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i in range(n):
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        t = (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy + 1) / 2
        bg = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        bg = np.clip(bg + rng.normal(0, 0.04, bg.shape), 0, 1)
        im = Image.fromarray((bg.transpose(1, 2, 0) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        found = []
        for _ in range(rng.integers(1, 4)):
            s = int(rng.integers(12, 29))
            x1, y1 = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
            if any(_iou((x1, y1, x1 + s, y1 + s), b[:4]) > 0.1 for b in found):
                continue
            k = int(rng.integers(0, 3))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if k == 0:
                draw.rectangle((x1, y1, x1 + s - 1, y1 + s - 1), fill=colour)
            elif k == 1:
                draw.ellipse((x1, y1, x1 + s - 1, y1 + s - 1), fill=colour)
            else:
                draw.polygon([(x1 + s / 2, y1), (x1, y1 + s - 1), (x1 + s - 1, y1 + s - 1)], fill=colour)
            found.append(np.array([x1, y1, x1 + s, y1 + s, k], np.float32))
        images[i] = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
        boxes.append(np.stack(found) if found else np.zeros((0, 5), np.float32))
    return images, boxes


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
