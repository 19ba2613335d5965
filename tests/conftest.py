"""Shared fixtures: the digits example (trained CNN + calibration folder) and bundles built once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def pytest_sessionstart(session):
    """The CPU features the int8 figures of this run depend on, at the top of the run (also under -q, which
    hides pytest's own report header)."""
    from edgequant._runtime.edgequant_runtime import cpu_features, describe_cpu

    f = cpu_features()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"host CPU: {describe_cpu(f)}; int8 flags {' '.join(f['flags']) or '-'} "
                            f"(from {f['source']})")


def pytest_configure(config):
    config.addinivalue_line("markers", "host_kernels: opens a bundle built for a named target (full-range 8-bit "
                            "weights, mostly) with this CPU's int8 kernels; where .ci/run cannot rerun the whole "
                            "suite as an AVX2-only CPU, it reruns these and the int8_numerics tests under qemu")


def pytest_collection_modifyitems(config, items):
    """Every test that builds a target's bundle on this host (``target_bundle``) and runs it here (not on the
    emulated aarch64 python) is a host_kernels test: its outcome may depend on the CPU's int8 arithmetic."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "target_bundle" in names and "aarch64_python" not in names:
            item.add_marker(pytest.mark.host_kernels)


def load_example_module(path: Path, name: str):
    """Import an example's model.py under a unique module name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def digits_module():
    return load_example_module(DIGITS / "model.py", "_digits_example_model")


@pytest.fixture(scope="session")
def digits_split(digits_module):
    return digits_module.load_split()


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory):
    """The README's main job, through the library: the digits example exported with the default target."""
    import edgequant

    out = tmp_path_factory.mktemp("bundles") / "digits"
    return edgequant.export(f"{DIGITS / 'model.py'}:build", DIGITS / "data", out=out, progress=False)


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="session")
def target_bundle(digits_bundle, tmp_path_factory):
    """target name → the digits model built for that target (from the digits bundle's fp32 graph, so torch
    export runs once); built on first use and kept for the session."""
    import edgequant

    built = {}
    root = tmp_path_factory.mktemp("target-bundles")

    def get(name: str):
        if name not in built:
            built[name] = edgequant.export(digits_bundle.fp32_model_path, DIGITS / "data", out=root / name,
                                           target=name, progress=False)
        return built[name]

    return get


@pytest.fixture(scope="session")
def qat_example(tmp_path_factory):
    """examples/qat_digits: digits_dw with 3-bit weights, PTQ and QAT (4 epochs) bundles."""
    example = load_example_module(ROOT / "examples" / "qat_digits" / "qat_digits.py", "_qat_digits_example")
    result = example.run(tmp_path_factory.mktemp("qat"), epochs=4, log=lambda line: None)
    return example, result


def residual_block(channels: int):
    """A ResNet basic block (Conv → BatchNorm → ReLU → Conv, plus the identity, then ReLU) with ``channels``
    channels: the residual pattern the fusion tests of PTQ and QAT both quantize. torch is imported here, so
    collecting the tests does not import it."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.b = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.bn(self.a(x)))) + x)

    return Block(channels)
