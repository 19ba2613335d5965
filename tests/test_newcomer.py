"""A newcomer's first hour: messages that name the fix in the user's own words (Python argument or CLI flag),
images read the same on the device as at export, the right words for 4-bit bundles, sizes that scale, and
export output a captured log can read."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgequant
from edgequant.cli import cli
from edgequant.units import format_bytes

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RUNTIME = ROOT / "runtimes" / "python"
sys.path.insert(0, str(RUNTIME))
import edgequant_runtime as rt  # noqa: E402


def _cli(*args) -> subprocess.CompletedProcess:
    """The real command in a fresh process, its output captured as a CI log would capture it (no terminal)."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "edgequant.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


# --- messages name the fix in the caller's words ----------------------------------------------------------------


def test_python_api_names_force_true_and_the_cli_names_force(digits_bundle, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    with pytest.raises(edgequant.BundleError) as err:
        edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=out, progress=False)
    assert "force=True" in str(err.value) and "--force" not in str(err.value)
    res = CliRunner().invoke(cli, ["export", str(digits_bundle.fp32_model_path), "--calibrate", str(DIGITS / "data"),
                                   "-o", str(out)])
    assert res.exit_code == 1
    assert "pass --force to replace it" in res.output and "force=True" not in res.output


def test_weight_only_options_are_named_as_python_arguments(digits_bundle, tmp_path):
    with pytest.raises(edgequant.UsageError) as err:
        edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=tmp_path / "x", block_size=64)
    assert str(err.value).startswith("block_size applies only to weight-only quantization: add weights=\"q8\"")
    assert "--" not in str(err.value)
    with pytest.raises(edgequant.UsageError, match='num_samples limits GPTQ.*weights="q4-gptq"'):
        edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=tmp_path / "x", weights="q8",
                         num_samples=8)


@pytest.fixture(scope="module")
def rgb_jpegs(tmp_path_factory):
    """Colour JPEGs of the digits (a camera's frames) for the grayscale digits model."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("rgb")
    for png in sorted((DIGITS / "images").glob("*.png"))[:12]:
        Image.open(png).convert("RGB").save(folder / f"{png.stem}.jpg", quality=95)
    return folder


def test_rgb_images_for_a_gray_model_name_channels_gray(rgb_jpegs, tmp_path):
    res = _cli("export", f"{DIGITS / 'model.py'}:build", "--calibrate", rgb_jpegs, "-o", tmp_path / "b")
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert err == [f"error: {rgb_jpegs}: the images become 3-channel inputs (rgb, nchw), but the model takes 1 "
                   "channel: pass --channels gray"], res.stderr
    assert "always_classified" not in res.stdout + res.stderr and not (tmp_path / "b").exists()
    with pytest.raises(edgequant.DataError, match=r'pass preprocess=ImagePreprocess\(channel_order="gray"\)$'):
        edgequant.export(f"{DIGITS / 'model.py'}:build", rgb_jpegs, out=tmp_path / "c", progress=False)


def test_an_onnx_model_given_rgb_images_names_channels_gray(digits_bundle, rgb_jpegs, tmp_path):
    with pytest.raises(edgequant.DataError, match=r"expects \[1, 8, 8\]: pass preprocess=ImagePreprocess"):
        edgequant.export(digits_bundle.fp32_model_path, rgb_jpegs, out=tmp_path / "c", progress=False)


# --- the device adapter: what a bundle takes, images through Pillow or its own PNG reader -----------------------


def test_adapter_given_an_image_for_an_array_bundle_says_what_it_takes(digits_bundle, capsys):
    png = DIGITS / "images" / "007.png"
    assert rt.main([str(digits_bundle.path), "--input", str(png)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {png}: this bundle has no image pre-processing, so it does not take images; it takes "
                   "a .npy of shape (N, 1, 8, 8) float32 (batch axis optional), pre-processed as at calibration")
    frame = np.zeros((8, 8), np.uint8)
    with pytest.raises(rt.InputError, match=r"got a uint8 image \[8, 8\], but this bundle has no image "
                                            r"pre-processing: it takes a \.npy of shape \(N, 1, 8, 8\) float32"):
        rt.Session(digits_bundle.path).run(frame)


@pytest.fixture(scope="module")
def gray_image_bundle(digits_bundle, tmp_path_factory):
    pre = edgequant.ImagePreprocess(channel_order="gray", scale=1 / 255, mean=(0.3052,), std=(0.3760,))
    return edgequant.export(digits_bundle.fp32_model_path, DIGITS / "images", preprocess=pre,
                            out=tmp_path_factory.mktemp("img") / "digits-img", progress=False)


def test_adapter_reads_jpeg_and_png_frames_like_the_exporter(gray_image_bundle, rgb_jpegs, capsys):
    """A colour JPEG from a camera runs on a gray image bundle (Pillow); its PNG twin gives the same argmax."""
    jpg, png = rgb_jpegs / "007.jpg", DIGITS / "images" / "007.png"
    assert rt.main([str(gray_image_bundle.path), "--input", str(jpg)]) == 0
    assert rt.main([str(gray_image_bundle.path), "--input", str(png)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("linear:")]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    # the exporter reads calibration images with the adapter's own function
    from edgequant.data.samples import load_samples

    samples = load_samples(DIGITS / "images", preprocess=edgequant.ImagePreprocess(
        channel_order="gray", scale=1 / 255, mean=(0.3052,), std=(0.3760,)))
    spec = gray_image_bundle.manifest["preprocess"]
    first = sorted((DIGITS / "images").glob("*.png"))[0]
    np.testing.assert_array_equal(next(iter(samples[0].values())), rt.preprocess_image(rt.read_image(first), spec))


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P"])
def test_pillow_and_the_builtin_png_reader_give_the_same_tensor(tmp_path, monkeypatch, mode):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8), "RGB")
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(colors=40)
    path = tmp_path / f"frame-{mode}.png"
    img.save(path)
    spec = {"channel_order": "gray" if mode in ("L", "LA") else "bgr", "scale": 1 / 255, "mean": [0.5],
            "std": [0.25], "layout": "nchw", "resize": [10, 12]}
    with_pillow = rt.read_image(path)
    monkeypatch.setitem(sys.modules, "PIL", None)  # as on a board without Pillow
    without = rt.read_image(path)
    np.testing.assert_array_equal(with_pillow, without)
    np.testing.assert_array_equal(rt.preprocess_image(with_pillow, spec), rt.preprocess_image(without, spec))
    jpg = tmp_path / "frame.jpg"
    jpg.write_bytes(b"\xff\xd8\xff")
    with pytest.raises(rt.InputError, match=r"reading \.jpg images needs Pillow here \(pip install pillow\)"):
        rt.read_image(jpg)


# --- words and units ---------------------------------------------------------------------------------------------


def test_sizes_scale_from_bytes_to_gibibytes():
    assert [format_bytes(n) for n in (0, 512, 100439, 88245.5 * 1024, 1.2 * 2**30)] == [
        "0 B", "512 B", "98.1 KiB", "86.2 MiB", "1.20 GiB"]


def test_a_4_bit_bundle_says_4_bit_everywhere(digits_bundle, tmp_path):
    out = tmp_path / "q4"
    res = CliRunner().invoke(cli, ["export", str(digits_bundle.fp32_model_path), "--calibrate", str(DIGITS / "data"),
                                   "-o", str(out), "--weights", "q4", "--block-size", "16"])
    assert res.exit_code == 0, res.output
    size = next(x for x in res.output.splitlines() if x.startswith("size"))
    assert " -> 4-bit weights " in size and "int8" not in size and "KiB" in size
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["quantization"]["precision"] == "4-bit weights, float activations"
    assert report["weights"]["precision"] == "4-bit weights, float activations"
    res = CliRunner().invoke(cli, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    row = next(x for x in res.output.splitlines() if "MatMulNBits" in x)
    assert "4-bit weights" in row and "int8" not in row
    last = res.output.strip().splitlines()[-1]
    assert "MACs in int8" not in last and "0 of 0" not in last
    assert last.startswith("1 of ") and "nodes quantized (1 with 4-bit weights); MACs quantized: 640 of " in last


# --- output a captured log can read ------------------------------------------------------------------------------


def test_captured_export_output_is_short_and_has_no_bars(tmp_path):
    res = _cli("export", f"{DIGITS / 'model.py'}:build", "--calibrate", DIGITS / "data", "-o", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    lines = (res.stdout + res.stderr).splitlines()
    assert len(lines) < 20, lines
    assert "\r" not in res.stdout + res.stderr
    assert res.stderr.splitlines()[:2] == ["calibrating (minmax): 240 samples ...",
                                          res.stderr.splitlines()[1]]
    assert res.stderr.splitlines()[1].startswith("calibrating (minmax): done, 240 samples in ")


def test_quiet_and_json_for_scripts(digits_bundle, tmp_path):
    args = ["export", str(digits_bundle.fp32_model_path), "--calibrate", str(DIGITS / "data")]
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "q"), "--quiet"])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "j"), "--json", "--no-progress"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["bundle"] == str(tmp_path / "j") and data["precision"] == "int8"
    assert data["fidelity"][0]["cosine"] > 0.999 and data["kernels"]["float_compute"] == []


def test_progress_lines_every_tenth_when_slow(monkeypatch):
    from edgequant import progress

    monkeypatch.setattr(progress, "QUIET_INTERVAL_S", 0.0)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    progress.log.addHandler(handler)
    monkeypatch.setattr(progress.log, "level", logging.INFO)
    try:
        with progress.progress_style("lines"):
            with progress.progress_bar(total=100, desc="calibrating", unit="sample") as bar:
                for _ in range(50):
                    bar.update(2)
    finally:
        progress.log.removeHandler(handler)
    msgs = [r.getMessage() for r in records]
    assert msgs[0] == "calibrating: 100 samples ..." and len(msgs) == 11
    assert msgs[5].startswith("calibrating: 50% (50/100 samples, ")
    assert msgs[-1].startswith("calibrating: done, 100 samples in ")
    with progress.progress_style("bars"):
        from tqdm import tqdm

        bar = progress.progress_bar(total=3, desc="x")
        assert isinstance(bar, tqdm)
        bar.close()


def test_version_names_the_libraries_and_the_cpu_features_for_int8():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0
    lines = res.output.strip().splitlines()
    from importlib.metadata import version

    assert lines[0] == f"edgequant {edgequant.__version__}"
    assert lines[1].startswith(f"onnxruntime {version('onnxruntime')}, onnx {version('onnx')}, "
                               f"torch {version('torch')}, numpy ")
    cpu = rt.cpu_features()
    assert lines[2].startswith(f"cpu {rt.describe_cpu(cpu)}: ")
    if cpu["arch"] == "x86_64":
        assert ("saturate" in lines[2]) == rt.int8_saturates(cpu)
        assert ("AVX2" in lines[2] or "AVX-512" in lines[2]) == ("avx2" in cpu["flags"])
