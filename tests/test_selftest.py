"""The self-test that travels with every bundle, and the device adapter refusing arithmetic its CPU cannot do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgequant._runtime import edgequant_runtime as rt

pytestmark = pytest.mark.int8_numerics


def _run(bundle, *args):
    """The bundle's own copy of the device adapter, as on the device."""
    return subprocess.run([sys.executable, str(bundle / "edgequant_runtime.py"), str(bundle), *args],
                          capture_output=True, text=True, timeout=300)


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle.path, tmp_path / "bundle")


def _rewrite(path, golden=None, manifest_edit=None):
    """Changes a bundle as a (careless) tool would, keeping the checksums consistent."""
    if golden is not None:
        np.savez(path / "golden.npz", **golden)
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest_edit:
        manifest_edit(manifest)
    for name, meta in manifest["files"].items():
        meta.update(sha256=rt.sha256_file(path / name), bytes=(path / name).stat().st_size)
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "manifest.sha256").write_text(rt.bundle_digest((path / "manifest.json").read_bytes()))  # and its digest


def _golden(path):
    with np.load(path / "golden.npz") as z:
        return {k: z[k] for k in z.files}


def test_selftest_passes_on_the_build_machine(digits_bundle):
    m = digits_bundle.manifest
    assert m["selftest"]["samples"] == 16 and m["selftest"]["tolerance_steps"] == 1.0
    assert "golden.npz" in m["files"] and m["selftest"]["step_source"]["linear"] == "output DequantizeLinear scale"
    assert "requires_cpu" not in m  # generic-cpu's 7-bit weights run anywhere
    golden = _golden(digits_bundle.path)
    assert golden["input.0.x"].shape == (1, 1, 8, 8) and golden["output.15.linear"].shape == (1, 10)
    result = rt.Session(digits_bundle.path).selftest()
    assert result.passed and result.samples == 16 and result.argmax_agreement == 1.0
    assert result.max_diff_steps <= 1.0
    proc = _run(digits_bundle.path, "--selftest")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("selftest PASS: 16 samples, argmax agreement 100.00%") and "\n" not in line
    assert "providers CPUExecutionProvider" in line and "CPU x86_64" in line


def test_selftest_fails_when_the_device_computes_otherwise(digits_bundle, tmp_path):
    path = _copy(digits_bundle, tmp_path)
    golden = _golden(path)
    step = digits_bundle.manifest["selftest"]["output_steps"]["linear"]
    golden["output.3.linear"] = golden["output.3.linear"] + np.float32(3 * step)  # 3 steps off on one sample
    _rewrite(path, golden)
    result = rt.Session(path).selftest()
    assert not result.passed and 2.9 < result.max_diff_steps < 3.1
    proc = _run(path, "--selftest")
    assert proc.returncode == 1 and proc.stdout.startswith("selftest FAIL: 16 samples")


def test_selftest_bad_bundles_get_one_line(digits_bundle, tmp_path):
    path = _copy(digits_bundle, tmp_path)
    data = bytearray((path / "golden.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # tampered
    (path / "golden.npz").write_bytes(bytes(data))
    with pytest.raises(rt.BundleError, match="golden.npz does not match its sha256"):
        rt.Session(path)
    proc = _run(path, "--selftest")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr

    golden = _golden(digits_bundle.path)
    golden["input.2.x"] = golden["input.2.x"][:, :, :4]  # data of another model
    _rewrite(path, golden)
    with pytest.raises(rt.BundleError, match=r"golden input 'x' #2 has shape \[1, 1, 4, 8\].*takes \['\?', 1, 8, 8\]"):
        rt.Session(path).selftest()

    def old(manifest):  # as exported before the self-test existed
        del manifest["selftest"], manifest["files"]["golden.npz"]

    (path / "golden.npz").unlink()
    _rewrite(path, manifest_edit=old)
    proc = _run(path, "--selftest")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error:") and "no self-test data" in proc.stderr
    assert proc.stderr.count("\n") == 1

    proc = _run(digits_bundle.path, "--selftest", "--providers", "XnnpackExecutionProvider")
    assert proc.returncode == 1 and "asks for XnnpackExecutionProvider, which this onnxruntime" in proc.stderr \
        and "Traceback" not in proc.stderr


def test_full_range_bundles_need_vnni_on_x86(target_bundle, digits_bundle):
    rpi5 = target_bundle("rpi5")
    assert rpi5.manifest["requires_cpu"] == {"x86_64_one_of": ["avx512_vnni", "avx_vnni"]}
    avx2 = {"arch": "x86_64", "flags": ["avx2"]}
    for ok in ({"arch": "x86_64", "flags": ["avx2", "avx_vnni"]}, {"arch": "aarch64", "flags": ["asimd"]}):
        assert rt.check_cpu(rpi5.manifest, ok) is None
    with pytest.raises(rt.ProviderError, match=r"full-range 8-bit weights.*x86_64 AVX2, no VNNI.*--target "
                                               r"generic-cpu.*allow_saturating_cpu=True"):
        rt.check_cpu(rpi5.manifest, avx2)
    assert "saturating" in rt.check_cpu(rpi5.manifest, avx2, allow=True)
    assert rt.check_cpu(digits_bundle.manifest, avx2) is None
    # on this machine: refused exactly when its own CPU lacks VNNI, otherwise the self-test passes
    if rt.int8_saturates(rt.cpu_features()):
        with pytest.raises(rt.ProviderError, match="no VNNI"):
            rt.Session(rpi5.path)
        assert rt.Session(rpi5.path, reference=True).run(np.zeros((1, 1, 8, 8), np.float32))
    else:
        assert rt.Session(rpi5.path).selftest().passed
