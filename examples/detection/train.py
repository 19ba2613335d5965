"""Train the tiny detector on generated shapes (about two minutes on one laptop core) and write its weights
and calibration samples.

    python examples/detection/train.py

Writes ``weights.pt`` and ``data/NNNN.png`` (60 generated 64×64 RGB images for calibration and the check;
``edgequant export`` reads an image folder as RGB / 255, NCHW: the model's input, and puts that
pre-processing in the manifest, so the device feeds camera frames as they come).
Deterministic on one machine: seeded generator and weights, one thread.

Training targets, as in YOLOv8 with one simplification (fixed assignment instead of a task-aligned one):
every grid cell whose centre lies inside a box, within 1.5 cells of the box centre, is a positive for that
box: its class target is 1 (binary cross-entropy over all cells and classes) and its 4 distances to the box
sides (in cells, clipped to 0..REG_MAX-1) are learned with Distribution Focal Loss (cross-entropy on the two
bins around the distance, weighted by closeness) plus L1 on the decoded distance.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model import GRID, HERE, REG_MAX, STRIDE, TinyDetector, generate

NUM_CALIBRATION = 60


def targets(boxes: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes per image → (class targets (N, 3, cells), distance targets (N, 4, cells), positive mask (N, cells))."""
    n, cells = len(boxes), GRID * GRID
    cls_t = np.zeros((n, 3, cells), np.float32)
    dist_t = np.zeros((n, 4, cells), np.float32)
    pos = np.zeros((n, cells), bool)
    centres = (np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="xy"), -1).reshape(-1, 2) + 0.5)
    for i, bs in enumerate(boxes):
        for x1, y1, x2, y2, k in sorted(bs.tolist(), key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
            b = np.array([x1, y1, x2, y2]) / STRIDE
            c = centres
            inside = (c[:, 0] > b[0]) & (c[:, 0] < b[2]) & (c[:, 1] > b[1]) & (c[:, 1] < b[3])
            near = np.abs(c - [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]).max(axis=1) <= 1.5
            sel = inside & near
            if not sel.any():
                sel = np.zeros(cells, bool)
                sel[np.argmin(np.abs(c - [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]).sum(axis=1))] = True
            cls_t[i, :, sel] = 0.0
            cls_t[i, int(k), sel] = 1.0
            d = np.stack([c[:, 0] - b[0], c[:, 1] - b[1], b[2] - c[:, 0], b[3] - c[:, 1]], 0)
            dist_t[i][:, sel] = np.clip(d[:, sel], 0, REG_MAX - 1 - 1e-3)
            pos[i, sel] = True
    return torch.from_numpy(cls_t), torch.from_numpy(dist_t), torch.from_numpy(pos)


def loss_fn(model: TinyDetector, x, cls_t, dist_t, pos) -> torch.Tensor:
    box, cls = model.raw(x)
    l_cls = F.binary_cross_entropy_with_logits(cls, cls_t, reduction="sum") / max(1, int(pos.sum()))
    logits = box.permute(0, 3, 1, 2)[pos]  # (P, 4, REG_MAX)
    t = dist_t.permute(0, 2, 1)[pos]  # (P, 4)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=REG_MAX - 1)
    wl, wh = hi.float() - t, t - lo.float()
    logp = logits.log_softmax(-1)
    l_dfl = -(logp.gather(-1, lo[..., None])[..., 0] * wl + logp.gather(-1, hi[..., None])[..., 0] * wh).mean()
    expect = (logits.softmax(-1) * torch.arange(REG_MAX, dtype=torch.float32)).sum(-1)
    return l_cls + l_dfl + 0.5 * F.l1_loss(expect, t)


def main(steps: int = 600, batch: int = 32) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = TinyDetector()
    x_all, boxes = generate(2000, seed=0)
    cls_t, dist_t, pos = targets(boxes)
    x_all = torch.from_numpy(x_all)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch))
        loss = loss_fn(model, x_all[idx], cls_t[idx], dist_t[idx], pos[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    torch.save(model.state_dict(), HERE / "weights.pt")
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    images, _ = generate(NUM_CALIBRATION, seed=1)
    for i, im in enumerate(images):
        Image.fromarray((im.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(data / f"{i:04d}.png",
                                                                                      optimize=True)
    print(f"wrote {HERE / 'weights.pt'} and {NUM_CALIBRATION} samples in {data}")


if __name__ == "__main__":
    main()
