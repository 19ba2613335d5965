"""Which arithmetic each target computes, how the exporter measures it, and what this CPU can do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgequant
from edgequant._runtime.edgequant_runtime import cpu_features, describe_cpu, int8_saturates
from edgequant.errors import TargetError
from edgequant.graph.sessions import checked_with, host_would_differ

pytestmark = pytest.mark.int8_numerics
ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"arch": "x86_64", "flags": ["avx2"], "source": "test"}
VNNI = {"arch": "x86_64", "flags": ["avx2", "avx512f", "avx512_vnni"], "source": "test"}
ALDER = {"arch": "x86_64", "flags": ["avx2", "avx_vnni"], "source": "test"}
ARM = {"arch": "aarch64", "flags": ["asimd", "asimddp"], "source": "test"}

# What each built-in target's int8 kernels compute (the profile's comments give the reason).
EXPECTED = {"android-nnapi": "exact", "arm64": "exact", "generic-cpu": "host-kernels", "jetson-orin": "exact",
            "rpi4": "exact", "rpi5": "exact", "rpi5-xnnpack": "exact", "x86-avx2": "host-kernels",
            "x86-vnni": "vnni-kernels", "x86-vnni-transformer": "vnni-kernels"}


def test_every_profile_states_its_arithmetic():
    targets = {t.name: t for t in edgequant.list_targets()}
    assert set(targets) == set(EXPECTED)
    for name, kind in EXPECTED.items():
        assert targets[name].runtime.arithmetic == kind, name
        assert f'arithmetic = "{kind}"' in (ROOT / "toolchains" / f"{name}.toml").read_text(), name
        assert targets[name].to_dict()["runtime"]["arithmetic"] == kind
        # host-kernels profiles are exactly those whose weights cannot saturate on any x86 CPU
        assert (kind == "host-kernels") == (not targets[name].full_range_weights), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_checked_with_follows_target_and_host(name):
    tgt = edgequant.load_target(name)
    kind = EXPECTED[name]
    for host in (AVX2, VNNI, ALDER, ARM):
        c = checked_with(tgt, host)
        if kind == "exact" or (kind == "vnni-kernels" and host in (AVX2, ARM)):
            assert (c.arithmetic, c.level) == ("exact", "basic"), (name, host)
        else:
            assert (c.arithmetic, c.level) == ("host-kernels", tgt.runtime.graph_optimization_level), (name, host)
        assert c.to_dict()["host_cpu"] == host
        # only an x86 host without VNNI computes a full-range bundle differently from its target
        differs = host is AVX2 and tgt.full_range_weights and tgt.runtime.cpu_int8_fusion \
            and name != "android-nnapi"  # NNAPI's CPU fallback runs at level basic: nothing fused, nothing saturates
        assert host_would_differ(tgt, c) == differs, (name, host)


def test_host_kernels_needs_weights_that_cannot_saturate(tmp_path):
    text = (ROOT / "toolchains" / "generic-cpu.toml").read_text().replace("pair_saturation = true",
                                                                          "pair_saturation = false")
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(TargetError, match="host-kernels.*pair_saturation = true"):
        edgequant.load_target(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text(text.replace('"host-kernels"', '"fast"'))
    with pytest.raises(TargetError, match="arithmetic must be one of exact, host-kernels, vnni-kernels"):
        edgequant.load_target(tmp_path / "typo.toml")


def test_cpu_features_agree_with_the_kernel():
    f = cpu_features()
    assert f["arch"] in ("x86_64", "aarch64") and f["source"] in ("cpuid", "/proc/cpuinfo")
    if f["arch"] != "x86_64" or not Path("/proc/cpuinfo").is_file():
        return
    listed = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            listed.update(line.split(":", 1)[1].split())
    assert set(f["flags"]) <= listed  # CPUID never reports what the kernel lacks
    if os.environ.get("EDGEQUANT_EMULATED_CPU"):  # under qemu -cpu X: /proc/cpuinfo is the host's, CPUID X's
        return
    for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"):
        assert (flag in f["flags"]) == (flag in listed), flag  # CPUID and the kernel's list say the same here
    assert int8_saturates(f) == (not {"avx512_vnni", "avx_vnni"} & listed)
    assert describe_cpu(AVX2) == "x86_64 AVX2, no VNNI"
    assert describe_cpu(VNNI) == "x86_64 AVX-512, VNNI (avx512_vnni)"
    assert not int8_saturates(ARM) and not int8_saturates(ALDER) and int8_saturates(AVX2)


@pytest.mark.skipif(shutil.which("qemu-x86_64-static") is None, reason="qemu-x86_64-static is not installed "
                    "(apt-get install qemu-user-static)")
def test_cpu_features_see_an_emulated_avx2_cpu():
    """/proc/cpuinfo shows the host's flags to an emulated program; CPUID shows the emulated CPU."""
    code = ("import sys; sys.path.insert(0, 'runtimes/python'); import edgequant_runtime as r; "
            "f = r.cpu_features(); print(f['source'], ' '.join(f['flags']), r.int8_saturates(f))")
    out = subprocess.run(["qemu-x86_64-static", "-cpu", "Haswell", sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["cpuid", "avx2", "True"]


def test_rpi5_report_is_the_targets_on_any_host(target_bundle):
    """The digits rpi5 bundle reports the Pi's arithmetic (0.99996, bit-identical to aarch64 onnxruntime) on
    AVX2 and VNNI hosts alike; an AVX2 host also says what its own kernels would give (0.977) and what to do."""
    from edgequant.cli import summary

    bundle = target_bundle("rpi5")
    report = bundle.report
    fid = report["fidelity"][0]
    assert fid["cosine"] >= 0.9999 and fid["argmax_agreement"] == 1.0
    assert report["checked_with"]["arithmetic"] == "exact" and report["checked_with"]["onnxruntime_level"] == "basic"
    host = cpu_features()
    assert report["checked_with"]["host_cpu"]["flags"] == host["flags"]
    lines = summary(report, bundle.path).splitlines()
    assert sum(line.startswith("checked  in exact arithmetic (onnxruntime level basic)") for line in lines) == 1
    if int8_saturates(host):
        here = report["host_kernels"]["fidelity"][0]["cosine"]
        assert here < 0.99, here  # the saturating AVX2 kernels: 0.977 on this bundle
        (line,) = [line for line in lines if line.startswith("host ")]
        assert f"would run this bundle at cosine {here:.5f}; the target computes {fid['cosine']:.5f}" in line
        assert "--target generic-cpu" in line
    else:
        assert report["host_kernels"] is None and not any(line.startswith("host ") for line in lines)


def test_layer_table_and_fidelity_agree(target_bundle):
    """The per-layer table's row for the model output and the fidelity line measure one arithmetic."""
    report = target_bundle("arm64").report
    fid = report["fidelity"][0]
    (row,) = [r for r in report["layers"] if r["tensor"] == fid["output"]]
    assert abs(row["accumulated_max_abs_error"] - fid["max_abs_error"]) <= 1e-5 * max(fid["max_abs_error"], 1e-3)
    # SQNR of the output ↔ its cosine: 1 - cos ≈ 1 / (2 SNR) for small noise, within a factor of 3
    snr = 10 ** (row["accumulated_sqnr_db"] / 10)
    assert 1 / 3 < (1 - fid["cosine"]) * 2 * snr < 3, (row, fid)
