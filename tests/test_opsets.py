"""Models at any opset ONNX Runtime runs (7-23) export: old models (IR 3, initializers listed as graph inputs)
are raised to the target's opset; a conversion that fails says what to do instead, in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import edgequant
from edgequant.check.metrics import sqnr_db
from edgequant.cli import cli
from edgequant.errors import ExportError
from edgequant.frontend.torch_export import constant_initializers, convert_opset
from graphs import old_conv_gemm

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("opset", range(7, 24))
def test_every_opset_ort_runs_exports_at_the_targets_opset(opset, tmp_path):
    model = old_conv_gemm(opset)
    x = np.random.default_rng(opset).random((24, 3, 16, 16), dtype=np.float32)
    bundle = edgequant.export(model, {"data_0": x}, out=tmp_path / "b", progress=False, layer_report=False)
    int8 = onnx.load(str(bundle.path / "model.onnx"))
    assert [(o.domain, o.version) for o in int8.opset_import] == [("", 18)]
    assert int8.ir_version >= onnx.helper.find_min_ir_version_for(list(int8.opset_import))
    assert [i.name for i in int8.graph.input] == ["data_0"]  # the weights are constants, not inputs
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) >= 2
    ref, got = _run(model, x), _run(str(bundle.path / "model.onnx"), x)
    assert sqnr_db(ref, got) > 25.0  # measured 31-36 dB


def test_initializers_listed_as_inputs_become_constants():
    model = old_conv_gemm(9)
    assert model.ir_version == 3 and len(model.graph.input) == 5
    fixed = constant_initializers(model)
    assert fixed.ir_version == 4 and [i.name for i in fixed.graph.input] == ["data_0"]
    assert len(model.graph.input) == 5  # the caller's model is left as it was
    onnx.checker.check_model(fixed)
    modern = old_conv_gemm(9)
    del modern.graph.input[1:]
    modern.ir_version = 4
    assert constant_initializers(modern) is modern


@pytest.mark.parametrize("name", ["squeezenet", "inception_v1"])
def test_onnx_model_zoo_graphs_at_opset_9_export_via_the_cli(name, tmp_path):
    """ONNX's own zoo graphs (opset 9, IR 3, as the onnx wheel ships them: weights built by ConstantOfShape),
    which were refused with a circular "use --opset 9" before."""
    path = ZOO / f"light_{name}.onnx"
    src = onnx.load(str(path))
    assert src.ir_version == 3 and src.opset_import[0].version == 9
    data = tmp_path / "data.npz"
    np.savez(data, data_0=np.random.default_rng(0).random((6, 3, 224, 224), dtype=np.float32))
    result = CliRunner().invoke(cli, ["export", str(path), "--calibrate", str(data), "-o", str(tmp_path / "b"),
                                      "--no-progress", "--no-layer-report"])
    assert result.exit_code == 0, result.output
    int8 = onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert int8.opset_import[0].version == 18
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) >= 5


def test_a_failed_conversion_names_a_fix_that_exists(monkeypatch):
    def fail(_model, _opset):
        raise RuntimeError("ConvertError: No Adapter For Mystery")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    with pytest.raises(ExportError) as old:
        convert_opset(old_conv_gemm(9), 18)
    msg = str(old.value)
    assert "from opset 9 to 18" in msg and "re-export the model at opset 18" in msg and "opset=9" not in msg
    with pytest.raises(ExportError) as new:
        convert_opset(old_conv_gemm(21), 18)
    assert "opset=21 (the model's own opset)" in str(new.value)


@pytest.mark.parametrize("opset", [9, 12, 24])
def test_an_opset_no_bundle_can_have_is_refused_before_any_work(opset, tmp_path):
    from edgequant.errors import UsageError

    with pytest.raises(UsageError, match=f"opset {opset} is out of range: use 13-23"):
        edgequant.export(old_conv_gemm(9), {"data_0": np.zeros((4, 3, 16, 16), np.float32)}, out=tmp_path / "b",
                         opset=opset)
    assert not (tmp_path / "b").exists()
