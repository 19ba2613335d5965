"""ARM64 in the test suite: the self-test of digits bundles run by aarch64 onnxruntime 1.32.0 (the PyPI wheel,
under ``qemu-aarch64-static -cpu cortex-a76``, a Raspberry Pi 5's core) must agree with the exporter's own
check: argmax agreement 100% and at most one output step.

The emulated Python is built by ``tests/aarch64/setup.sh`` (``.ci/run`` does it, into
``~/.cache/edgequant/aarch64`` or ``$EDGEQUANT_AARCH64``, kept between runs). Without it a local run skips these
tests and says how to prepare it; under ``EDGEQUANT_REQUIRE_AARCH64=1`` (CI) its absence fails them.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

AARCH64 = Path(os.environ.get("EDGEQUANT_AARCH64") or Path.home() / ".cache" / "edgequant" / "aarch64")
LINE = re.compile(r"^selftest (PASS|FAIL): (\d+) samples, argmax agreement ([\d.]+)%, max \|diff\| ([\d.]+) "
                  r"output steps .*; CPU aarch64 ")


@pytest.fixture(scope="session")
def aarch64_python() -> Path:
    python = AARCH64 / "python"
    if not python.is_file():
        reason = (f"no emulated aarch64 python at {AARCH64}: run tests/aarch64/setup.sh {AARCH64} (root, Debian "
                  "apt and PyPI; about a minute), or set EDGEQUANT_AARCH64 to one")
        if os.environ.get("EDGEQUANT_REQUIRE_AARCH64") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def selftest_on_arm(python: Path, bundle: Path) -> tuple[str, int, float, float]:
    """The bundle's own adapter under aarch64 onnxruntime → (PASS|FAIL, samples, agreement %, max steps)."""
    proc = subprocess.run([str(python), str(bundle / "edgequant_runtime.py"), str(bundle), "--selftest"],
                          capture_output=True, text=True, timeout=600)
    m = LINE.match(proc.stdout)
    assert m, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == (0 if m.group(1) == "PASS" else 1)
    return m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(4))


@pytest.mark.parametrize("name", ["generic-cpu", "arm64", "rpi5"])
def test_digits_selftest_on_aarch64(name, digits_bundle, target_bundle, aarch64_python):
    bundle = digits_bundle if name == "generic-cpu" else target_bundle(name)
    assert bundle.manifest["target"]["name"] == name
    verdict, samples, agreement, steps = selftest_on_arm(aarch64_python, bundle.path)
    assert (verdict, samples, agreement) == ("PASS", 16, 100.0) and steps <= 1.0, (name, steps)


def test_qat_selftest_on_aarch64(qat_example, aarch64_python):
    bundle = qat_example[1]["qat_bundle"]
    assert bundle.report["source"] == "qat"
    verdict, samples, agreement, steps = selftest_on_arm(aarch64_python, bundle.path)
    assert (verdict, samples, agreement) == ("PASS", 16, 100.0) and steps <= 1.0, steps


def test_mobile_block_selftest_on_aarch64(tmp_path, aarch64_python):
    """generic-cpu's kernel rewrites — a depthwise region padded to 80 channels, the RGB input spread to 8, the
    HardSigmoids as int8 Adds — compute on ARM what the exporter checked on x86."""
    import numpy as np

    import edgequant
    from test_mobile_kernels import _mobile_block, all_choices

    x = np.random.default_rng(0).uniform(0, 1, (48, 3, 32, 32)).astype(np.float32)
    bundle = edgequant.export(_mobile_block(), x, out=tmp_path / "mobile", progress=False, target=all_choices())
    algo = bundle.report["algorithms"]
    assert algo["padded_depthwise"] and algo["padded_inputs"][0]["spread"]
    verdict, samples, agreement, steps = selftest_on_arm(aarch64_python, bundle.path)
    assert (verdict, samples, agreement) == ("PASS", 9, 100.0) and steps <= 1.0, steps
