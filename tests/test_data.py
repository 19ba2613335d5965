"""Calibration data sources: .npy/.npz folders, stacked files, images with recorded pre-processing, iterables."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgequant.data.samples import ImagePreprocess, load_samples
from edgequant.errors import DataError

from edgequant._runtime.edgequant_runtime import preprocess_image


def test_npz_folder_keys_by_input_name(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", ids=np.arange(5) + i, mask=np.ones(5, np.int64))
    samples = load_samples(tmp_path).bind(["ids", "mask"])
    assert len(samples) == 3 and set(samples[2]) == {"ids", "mask"}
    np.testing.assert_array_equal(samples[2]["ids"], np.arange(5) + 2)
    with pytest.raises(DataError, match="do not match the model inputs"):
        load_samples(tmp_path).bind(["input_ids", "attention_mask"])


def test_stacked_npz_and_array_and_iterables(tmp_path):
    np.savez(tmp_path / "all.npz", a=np.zeros((6, 2), np.float32), b=np.ones((6, 3), np.float32))
    assert len(load_samples(tmp_path / "all.npz")) == 6
    np.savez(tmp_path / "bad.npz", a=np.zeros((6, 2)), b=np.ones((5, 3)))
    with pytest.raises(DataError, match="different numbers of samples"):
        load_samples(tmp_path / "bad.npz")
    assert len(load_samples(np.zeros((4, 3), np.float32))) == 4
    assert load_samples([{"x": np.zeros(2)}, {"x": np.ones(2)}])[1]["x"].sum() == 2
    with pytest.raises(DataError, match="empty"):
        load_samples([])
    with pytest.raises(DataError, match="differs"):
        load_samples([np.zeros(2), np.zeros(3)])


def test_single_array_data_needs_a_single_input_model():
    with pytest.raises(DataError, match="has 2 inputs"):
        load_samples([np.zeros(2)]).bind(["a", "b"])


def test_images_are_preprocessed_as_on_the_device(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "frame.png")
    spec = ImagePreprocess(resize=(10, 12), scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25),
                           channel_order="bgr", layout="nchw")
    (sample,) = load_samples(tmp_path, preprocess=spec)
    x = sample[""] if "" in sample else next(iter(sample.values()))
    assert x.shape == (3, 10, 12) and x.dtype == np.float32
    np.testing.assert_array_equal(x, preprocess_image(pixels, spec.to_dict()))
    # bgr: channel 0 comes from the red-last order
    flat = preprocess_image(pixels, {**spec.to_dict(), "resize": None})
    np.testing.assert_allclose(flat[0], (pixels[:, :, 2] / 255 - 0.5) / 0.2, atol=1e-5)


def test_resize_keeps_constant_images_constant():
    img = np.full((17, 9, 1), 200, np.uint8)
    out = preprocess_image(img, {"resize": [8, 8], "scale": 1.0, "channel_order": "gray", "layout": "nhwc"})
    assert out.shape == (8, 8, 1)
    np.testing.assert_allclose(out, 200.0)


def test_bad_preprocess_options():
    with pytest.raises(DataError, match="layout"):
        ImagePreprocess(layout="chw")
    with pytest.raises(DataError, match="std"):
        ImagePreprocess(std=(0.0,))
