"""edgequant device runtime: load an edgequant bundle and run it with ONNX Runtime.

Imports only the standard library, numpy and onnxruntime, so this one file can be copied next to a bundle
and run on a Raspberry Pi, a Jetson or any machine with onnxruntime. The bundle format is documented in
``runtimes/README.md``.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 1

# --- pre-processing -------------------------------------------------------------------------------------------
# The exporter calibrates through these same functions, so a camera frame becomes exactly the tensor the
# int8 ranges were measured on.


def to_channels(image: np.ndarray, channel_order: str) -> np.ndarray:
    """uint8 image (H, W) or (H, W, 3|4) in RGB(A) order → (H, W, C) in ``channel_order`` (rgb, bgr, gray)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {img.shape}")
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if channel_order == "gray":
        if img.shape[2] == 1:
            return img
        # ITU-R 601-2 luma, the same weights as PIL's "L" mode.
        rgb = img.astype(np.float32)
        luma = rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114
        return np.clip(np.floor(luma + 0.5), 0, 255).astype(np.uint8)[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if channel_order == "bgr":
        return img[:, :, ::-1]
    if channel_order == "rgb":
        return img
    raise ValueError(f"channel_order must be rgb, bgr or gray, not {channel_order!r}")


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) array → (height, width, C) float32, bilinear with half-pixel centres (no anti-aliasing)."""
    src = image.astype(np.float32)
    h, w = src.shape[:2]
    if (h, w) == (height, width):
        return src

    def grid(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = grid(height, h)
    x0, x1, fx = grid(width, w)
    top = src[y0][:, x0] * (1 - fx)[None, :, None] + src[y0][:, x1] * fx[None, :, None]
    bottom = src[y1][:, x0] * (1 - fx)[None, :, None] + src[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def preprocess_image(image: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 image (H, W[, C]) → float32 model input without batch axis, per the manifest's ``preprocess``.

    x = ((resize(pixels) * scale) - mean) / std, per channel, then laid out as ``layout`` (nchw → C,H,W).
    """
    img = to_channels(image, spec.get("channel_order", "rgb"))
    size = spec.get("resize")
    out = resize_bilinear(img, int(size[0]), int(size[1])) if size else img.astype(np.float32)
    out = out * np.float32(spec.get("scale", 1.0))
    channels = out.shape[2]
    mean = np.asarray(spec.get("mean", [0.0]), dtype=np.float32)
    std = np.asarray(spec.get("std", [1.0]), dtype=np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise ValueError(f"mean/std need 1 or {channels} values, got {mean.size} and {std.size}")
    out = (out - mean.reshape(1, 1, -1)) / std.reshape(1, 1, -1)
    if spec.get("layout", "nchw") == "nchw":
        out = np.transpose(out, (2, 0, 1))
    return np.ascontiguousarray(out, dtype=np.float32)
