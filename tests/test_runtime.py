"""The device runtime adapter (runtimes/python/edgequant_runtime.py): verified loading, the same outputs as the
exporter's check, camera frames pre-processed as at calibration, no silent provider fallback, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import edgequant
from edgequant._runtime import edgequant_runtime as rt
from edgequant.data.samples import ImagePreprocess, load_samples
from edgequant.check.fidelity import compare_outputs

from conftest import DIGITS, run_onnx


def holdout(n_files: int = 300) -> np.ndarray:
    """The exporter's held-out check set for the digits data: every 5th sample."""
    return np.stack([np.load(DIGITS / "data" / f"{i:04d}.npy") for i in range(4, n_files, 5)])


def test_round_trip_matches_the_exporters_own_check(digits_bundle):
    sess = rt.Session(digits_bundle.path)
    x = holdout()
    out = sess.run({"x": x})["linear"]
    np.testing.assert_array_equal(out, run_onnx(digits_bundle.model_path, x))
    fp32 = run_onnx(digits_bundle.fp32_model_path, x)
    fid = compare_outputs("linear", fp32, out).to_dict()
    assert fid == digits_bundle.report["fidelity"][0]  # the report's figures, recomputed from the adapter
    assert sess.placement.keys() == {"CPUExecutionProvider"}
    assert "QLinearConv" in sess.placement["CPUExecutionProvider"]
    assert sess._session.end_profiling() == ""  # the placement run's profiler is off for the real runs


@pytest.fixture(scope="module")
def image_bundle(digits_bundle, tmp_path_factory):
    pre = ImagePreprocess(scale=1 / 255, mean=(0.3052,), std=(0.3760,), channel_order="gray")
    out = tmp_path_factory.mktemp("img") / "digits-img"
    return edgequant.export(digits_bundle.fp32_model_path, DIGITS / "images", out=out, preprocess=pre,
                            progress=False)


def test_camera_frame_becomes_the_calibration_input(image_bundle):
    from PIL import Image

    sess = rt.Session(image_bundle.path)
    images = sorted((DIGITS / "images").glob("*.png"))
    samples = load_samples(DIGITS / "images", preprocess=ImagePreprocess(
        scale=1 / 255, mean=(0.3052,), std=(0.3760,), channel_order="gray"))
    for i, path in enumerate(images):
        frame = rt.read_png(path)
        np.testing.assert_array_equal(frame, np.asarray(Image.open(path)))  # our PNG reader = PIL
        want = run_onnx(image_bundle.model_path, samples[i][""][None])
        np.testing.assert_array_equal(sess.run(frame)["linear"], want)
    rgb = np.repeat(rt.read_png(images[0])[:, :, None], 3, axis=2)  # a colour frame is converted to gray
    np.testing.assert_array_equal(sess.run(rgb)["linear"], sess.run(rt.read_png(images[0]))["linear"])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_png_reader_matches_pil_for_every_filter(tmp_path, mode):
    from PIL import Image

    yy, xx = np.mgrid[0:41, 0:57]
    rgb = np.stack([(xx * 7 + yy * 3) % 256, (xx * yy) % 256, np.random.default_rng(0).integers(0, 256, xx.shape)],
                   axis=2).astype(np.uint8)  # gradients and noise: PIL's encoder picks all five row filters
    img = Image.fromarray(rgb).convert(mode)
    img.save(tmp_path / "f.png", optimize=True)
    want = np.asarray(img.convert("RGB") if mode in ("P", "RGBA") else img)
    got = rt.read_png(tmp_path / "f.png")
    np.testing.assert_array_equal(got[:, :, :3] if mode == "RGBA" else got, want)


def test_png_reader_undoes_each_row_filter(tmp_path):
    """A PNG written here with row filters 0..4 in turn (PNG spec, section 9) reads back exactly."""
    import struct
    import zlib

    img = np.random.default_rng(1).integers(0, 256, (10, 9, 3)).astype(np.int32)
    rows, prev = [], np.zeros(27, np.int32)
    for y, line in enumerate(img.reshape(10, 27)):
        kind = y % 5
        left = np.concatenate([np.zeros(3, np.int32), line[:-3]])
        up_left = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
        p = left + prev - up_left
        pa, pb, pc = abs(p - left), abs(p - prev), abs(p - up_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        pred = [0, left, prev, (left + prev) // 2, paeth][kind]
        rows.append(bytes([kind]) + ((line - pred) % 256).astype(np.uint8).tobytes())
        prev = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9, 10, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    (tmp_path / "f.png").write_bytes(png)
    np.testing.assert_array_equal(rt.read_png(tmp_path / "f.png"), img.astype(np.uint8))
    (tmp_path / "g.png").write_bytes(png[:60])
    with pytest.raises(rt.InputError, match="g.png"):
        rt.read_png(tmp_path / "g.png")


def test_cli_runs_a_png_frame_and_benchmarks(image_bundle, capsys, tmp_path):
    frame = DIGITS / "images" / "000.png"
    saved = tmp_path / "out.npz"
    assert rt.main([str(image_bundle.path), "--input", str(frame), "--bench", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "linear: shape [1, 10] float32  argmax [" in out and "latency over 50 runs" in out
    want = rt.Session(image_bundle.path).run(rt.read_png(frame))["linear"]
    np.testing.assert_array_equal(np.load(saved)["linear"], want)


def copy_of(bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle.path, dst)
    return dst


def test_tampered_truncated_missing_and_newer_bundles_are_refused(digits_bundle, tmp_path):
    b = copy_of(digits_bundle, tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(rt.BundleError, match="does not match its sha256"):
        rt.Session(b)
    (b / "model.onnx").write_bytes(bytes(data[:-10]))
    with pytest.raises(rt.BundleError, match="is truncated or changed"):
        rt.Session(b)
    (b / "model.onnx").unlink()
    with pytest.raises(rt.BundleError, match="model.onnx is missing from the bundle"):
        rt.Session(b)
    shutil.copy(digits_bundle.model_path, b / "model.onnx")
    rt.Session(b)
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    with pytest.raises(rt.BundleError, match="schema_version 2, newer than this runtime reads"):
        rt.Session(b)
    assert rt.main([str(b), "--input", str(DIGITS / "data" / "0000.npy")]) == 1


def test_wrong_inputs_are_one_clear_line(digits_bundle):
    sess = rt.Session(digits_bundle.path)
    with pytest.raises(rt.InputError, match=r"input 'x' has shape \[1, 8, 8\], the model takes \['batch', 1, 8, 8\]"):
        sess.run(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(rt.InputError, match="input 'x' is float64, the model takes float32"):
        sess.run(np.zeros((1, 1, 8, 8)))
    with pytest.raises(rt.InputError, match="y are not the model's"):
        sess.run({"y": np.zeros((1, 1, 8, 8), np.float32)})


def test_missing_provider_is_refused_or_explained(target_bundle):
    bundle = target_bundle("jetson-orin")
    assert "TensorrtExecutionProvider" not in ort.get_available_providers()
    with pytest.raises(rt.ProviderError, match="asks for TensorrtExecutionProvider, CUDAExecutionProvider, which "
                                               "this onnxruntime"):
        rt.Session(bundle.path)
    # falling back puts the bundle's full-range int8 kernels on this CPU: refused too where its kernels saturate
    saturates = rt.int8_saturates(rt.cpu_features())
    if saturates:
        with pytest.raises(rt.ProviderError, match="full-range 8-bit weights, which this CPU .*no VNNI"):
            rt.Session(bundle.path, allow_fallback=True)
    sess = rt.Session(bundle.path, allow_fallback=True, allow_saturating_cpu=saturates)
    assert sess.missing == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert sess.providers == ["CPUExecutionProvider"]
    text = sess.describe()
    assert "missing here: TensorrtExecutionProvider, CUDAExecutionProvider" in text
    assert "nodes on CPUExecutionProvider (" in text and "QLinearConv 3" in text
    x = holdout()[:1]
    np.testing.assert_array_equal(sess.run(x)["linear"], run_onnx(bundle.model_path, x))


def test_the_cpu_check_applies_only_where_the_cpu_provider_runs_the_int8_kernels(target_bundle, monkeypatch):
    """On an AVX2-only CPU a jetson-orin bundle is refused for its providers (the CPU's arithmetic does not
    matter on TensorRT/CUDA); once it falls back to the CPU provider, for the CPU's saturating int8 kernels."""
    bundle = target_bundle("jetson-orin")
    assert bundle.manifest["requires_cpu"] == {"x86_64_one_of": ["avx512_vnni", "avx_vnni"]}
    monkeypatch.setattr(rt, "cpu_features", lambda: {"arch": "x86_64", "flags": ["avx2"], "source": "test"})
    with pytest.raises(rt.ProviderError, match="asks for TensorrtExecutionProvider, CUDAExecutionProvider"):
        rt.Session(bundle.path)
    with pytest.raises(rt.ProviderError, match=r"jetson-orin bundle has full-range 8-bit weights.*x86_64 AVX2, "
                                               r"no VNNI.*allow_saturating_cpu=True"):
        rt.Session(bundle.path, allow_fallback=True)
    sess = rt.Session(bundle.path, allow_fallback=True, allow_saturating_cpu=True)
    assert "QLinearConv" in sess.placement[rt.CPU]
    assert rt.Session(bundle.path, reference=True, allow_fallback=True).providers == [rt.CPU]  # fp32: any CPU
    monkeypatch.setattr(rt, "cpu_features", lambda: {"arch": "x86_64", "flags": ["avx2", "avx_vnni"],
                                                     "source": "test"})
    assert rt.Session(bundle.path, allow_fallback=True).providers == [rt.CPU]


def numpy_cpu_table() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return __cpu_features__


def test_cpu_detection_writes_no_machine_code_and_agrees_with_numpy(monkeypatch):
    """The device code reads the CPU through numpy's CPUID-based dispatch table and the kernel: nothing in
    runtimes/ maps executable memory. /proc/cpuinfo adds the flags numpy has no entry for (avx_vnni) only where
    it describes the CPU numpy sees; under an emulated or masked CPU it lists the host's flags instead."""
    root = Path(rt.__file__).resolve().parents[1]
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".c", ".cpp", ".h", ".rs", ".sh"):
            text = path.read_text(encoding="utf-8")
            for word in ("mmap", "PROT_EXEC", "mprotect", "CFUNCTYPE", "VirtualAlloc", "MAP_JIT"):
                assert word not in text, f"{path}: {word}"
    f = rt.cpu_features()
    if f["arch"] != "x86_64":
        assert f["source"] in ("auxv", "/proc/cpuinfo", "platform")
        return
    table = numpy_cpu_table()
    assert f["source"] == "cpuid"
    pairs = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI"}
    for flag, key in pairs.items():
        assert (flag in f["flags"]) == table[key], flag
    listed = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            listed.update(line.split(":", 1)[1].split())
    if all(table[k] == (flag in listed) for flag, k in pairs.items()):  # the CPU the kernel describes
        assert ("avx_vnni" in f["flags"]) == ("avx_vnni" in listed)
    # a smaller CPU than the kernel lists (qemu -cpu Haswell, masked CPUID): the kernel's extra flags are not its
    monkeypatch.setitem(table, "AVX512F", not table["AVX512F"])
    smaller = rt.cpu_features()
    assert ("avx512f" in smaller["flags"]) == table["AVX512F"]
    assert not {"avx_vnni", "amx_int8"} & set(smaller["flags"]) and smaller["source"] == "cpuid"


@pytest.mark.skipif(rt.cpu_features()["arch"] != "x86_64", reason="CPUID faulting is an x86 feature")
def test_avx2_launcher_shows_an_avx2_only_cpu_and_keeps_real_faults():
    """tests/avx2/run: numpy, PyTorch and the adapter see AVX2 without AVX-512 or VNNI (what .ci/run's second
    run relies on); a real segmentation fault still reaches Python's handler and kills the process. Where the
    machine refuses CPUID faulting, it exits 3 with one line."""
    launcher = Path(__file__).parent / "avx2" / "run"
    code = ("import sys, torch; sys.path.insert(0, 'runtimes/python'); import edgequant_runtime as r; "
            "f = r.cpu_features(); print(f['source'], ' '.join(f['flags']), r.int8_saturates(f), "
            "torch.backends.cpu.get_cpu_capability())")
    proc = subprocess.run([str(launcher), sys.executable, "-c", code], cwd=Path(rt.__file__).parents[2],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "CPUID faulting" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-800:]
    assert proc.stdout.split() == ["cpuid", "avx2", "True", "AVX2"]
    crash = subprocess.run([str(launcher), sys.executable, "-X", "faulthandler", "-c",
                            "import ctypes; ctypes.string_at(0)"], capture_output=True, text=True, timeout=120)
    assert crash.returncode == -11 and "Fatal Python error: Segmentation fault" in crash.stderr


def test_nodes_placed_outside_the_chain_are_refused_or_explained(digits_bundle):
    # AzureExecutionProvider is in every onnxruntime wheel and runs none of these nodes: ORT puts them on the CPU
    with pytest.raises(rt.ProviderError, match="could not place the model on AzureExecutionProvider"):
        rt.Session(digits_bundle.path, providers=["AzureExecutionProvider"])
    sess = rt.Session(digits_bundle.path, providers=["AzureExecutionProvider"], allow_fallback=True)
    assert set(sess.placement) == {"CPUExecutionProvider"}
    assert "running on AzureExecutionProvider: 11 nodes on CPUExecutionProvider" in sess.describe()
    # in the chain but given nothing: everything fell through to the CPU provider behind it
    chain = ["AzureExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(rt.ProviderError, match="AzureExecutionProvider is available but onnxruntime gave it none"):
        rt.Session(digits_bundle.path, providers=chain)
    assert rt.Session(digits_bundle.path, providers=chain, allow_fallback=True).providers == chain


def device_venv(tmp_path: Path) -> tuple[str, Path, dict[str, str]]:
    """A venv without pip whose only packages are numpy and onnxruntime (linked from this environment) →
    (its python, its site-packages, an environment for subprocesses); ``link(site, module)`` adds a package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    for module in (np, ort):
        link(site, module)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return str(venv / "bin" / "python"), site, env


def link(site: Path, module) -> None:
    src = Path(module.__file__).parent
    os.symlink(src, site / src.name)
    for libs in src.parent.glob(f"{src.name}.libs"):  # vendored shared libraries of manylinux wheels
        os.symlink(libs, site / libs.name)


def test_adapter_runs_where_there_is_no_torch(digits_bundle, tmp_path):
    """A venv without pip whose only packages are numpy and onnxruntime (linked from this environment)."""
    python, _, env = device_venv(tmp_path)
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr
    x = tmp_path / "x.npy"
    np.save(x, holdout()[:3])
    run = subprocess.run([python, str(digits_bundle.path / "edgequant_runtime.py"), str(digits_bundle.path),
                          "--input", str(x)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    want = np.argmax(run_onnx(digits_bundle.model_path, holdout()[:3]), axis=1).tolist()
    assert f"linear: shape [3, 10] float32  argmax {want}" in run.stdout
    imported = subprocess.run([python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import edgequant_runtime; "
                               "print(sorted(m for m in sys.modules if m in ('torch', 'edgequant')))",
                               str(digits_bundle.path)], capture_output=True, text=True, env=env)
    assert imported.stdout.strip() == "[]", imported.stderr
