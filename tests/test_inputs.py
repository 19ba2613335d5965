"""Inputs as graphs declare them: the batch axis comes from the graph (its dim_param), inputs without one
(recurrent state, a scalar) are fed as given; int64/bool/scalar inputs, If subgraphs, unknown ranks and
symbolic dimensions export. Bad input of each kind is one line naming the input or node, exit code 1."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import graphs
from edgequant.check.metrics import sqnr_db
from edgequant.cli import cli
from edgequant.data.samples import load_samples
from edgequant.frontend.shapes import batch_axes
from edgequant.graph.sessions import batches

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same data whatever runs before it."""
    global RNG
    RNG = np.random.default_rng(0)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _export(tmp_path, model: onnx.ModelProto, samples: list[dict], *extra: str):
    """Model and samples written as a user would (an .onnx file, one .npz per sample) → the CLI's result."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path, data = tmp_path / "model.onnx", tmp_path / "data"
    onnx.save(model, str(path))
    data.mkdir()
    for i, sample in enumerate(samples):
        np.savez(data / f"{i:02d}.npz", **sample)
    return CliRunner().invoke(cli, ["export", str(path), "--calibrate", str(data), "-o", str(tmp_path / "out"),
                                    "--no-progress", *extra])


def _fidelity(tmp_path) -> dict[str, float]:
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    return {f["output"]: f["sqnr_db"] for f in report["fidelity"]}


def _one_line(result, *needles: str) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_batch_axis_comes_from_the_graph():
    assert batch_axes(graphs.time_major(), {"x": _f32(5, 8)}) == {"x": 1}  # [T, N, C]: N
    assert batch_axes(graphs.time_major(5), {"x": _f32(5, 8)}) == {"x": 1}
    mixed = {"x": _f32(16), "ids": np.arange(4), "flag": np.array(True), "gain": np.float32(2.0)}
    assert batch_axes(graphs.mixed_inputs(), mixed) == {"x": 0, "ids": 0, "flag": 0, "gain": None}
    cell = graphs.recurrent_cell()
    assert batch_axes(cell, {"x": _f32(8), "state": _f32(1, 16), "sr": np.int64(16000)}) == \
        {"x": 0, "state": 1, "sr": None}
    assert batch_axes(cell, {"x": _f32(1, 8), "state": _f32(1, 1, 16), "sr": np.int64(16000)}) == \
        {"x": None, "state": None, "sr": None}  # whole inputs, fed as given
    for value in cell.graph.input:  # no batch symbol, sizes unknown: the free axis, not the fixed one
        for d in value.type.tensor_type.shape.dim:
            d.Clear()
    cell.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 1
    assert batch_axes(cell, {"x": _f32(8), "state": _f32(1, 16), "sr": np.int64(0)})["state"] == 1
    assert batch_axes(graphs.unknown_rank(), {"x": _f32(3, 8, 8)}) == {"x": 0}


def test_batches_stack_each_input_along_its_axis():
    samples = load_samples([{"x": _f32(8), "state": _f32(1, 16)} for _ in range(5)])
    bound = samples.with_batch_axes({"x": 0, "state": 1})
    first = next(batches(bound, 4, {}))
    assert first["x"].shape == (4, 8) and first["state"].shape == (1, 4, 16)
    np.testing.assert_array_equal(first["state"][:, 2], bound[2]["state"])
    listed = next(batches([bound[i] for i in range(5)], 4, {}))  # a list of samples batches the same way
    assert listed["state"].shape == (1, 4, 16)
    given = samples.with_batch_axes({"x": 0, "state": None})
    assert [b["state"].shape for b in batches(given, 4, {})] == [(1, 16)] * 5  # as given, one sample a batch


def test_time_major_sequence_batches_on_axis_1(tmp_path):
    """[T=5, N, 8]: stacked on axis 0 the batches would not fit the fixed T."""
    result = _export(tmp_path, graphs.time_major(5), [{"x": _f32(5, 8)} for _ in range(20)])
    assert result.exit_code == 0, result.output
    assert _fidelity(tmp_path)["y"] > 28.0  # measured 34.2 dB
    with np.load(tmp_path / "out" / "golden.npz") as golden:
        assert golden["input.0.x"].shape == (5, 1, 8)
    # the kernel choices time and profile the model on a batch of 1 along axis 1 too: both MatMuls profiled
    choices = json.loads((tmp_path / "out" / "report.json").read_text())["kernel_choices"]
    assert choices["float_where_faster"]["profiled_nodes"] == 2 and "profiles failed" not in result.output


def test_recurrent_state_and_scalar_inputs_calibrate_as_given(tmp_path):
    """state [1, batch, 16] and a scalar int64 sample rate, given per sample without the batch axis, or as
    the whole input the model takes (state [1, 1, 16], x [1, 8]): both export, to the same int8 model."""
    data = [(_f32(8), np.tanh(_f32(1, 16))) for _ in range(20)]
    sr = np.array(16000, np.int64)
    plain = _export(tmp_path / "plain", graphs.recurrent_cell(), [{"x": x, "state": h, "sr": sr} for x, h in data])
    whole = _export(tmp_path / "whole", graphs.recurrent_cell(),
                    [{"x": x[None], "state": h[:, None], "sr": sr} for x, h in data])
    assert plain.exit_code == 0 and whole.exit_code == 0, plain.output + whole.output
    fid = _fidelity(tmp_path / "plain")
    assert fid["prob"] > 28.0 and fid["stateN"] > 22.0  # measured 34.1 / 26.6 dB
    assert _fidelity(tmp_path / "whole") == fid
    assert (tmp_path / "plain" / "out" / "model.onnx").read_bytes() == \
        (tmp_path / "whole" / "out" / "model.onnx").read_bytes()
    s = ort.InferenceSession(str(tmp_path / "plain" / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape for i in s.get_inputs()] == [["batch", 8], [1, "batch", 16], []]


def test_one_stacked_npz_with_a_shared_scalar(tmp_path):
    """One .npz with every sample stacked along axis 0 and the sample rate given once (0-d): the scalar is the
    same in every sample."""
    data = tmp_path / "calib.npz"
    np.savez(data, x=_f32(20, 8), state=np.tanh(_f32(20, 1, 16)), sr=np.array(16000, np.int64))
    onnx.save(graphs.recurrent_cell(), str(tmp_path / "cell.onnx"))
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "cell.onnx"), "--calibrate", str(data), "-o",
                                      str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert min(_fidelity(tmp_path).values()) > 22.0
    samples = load_samples(data)
    assert len(samples) == 20 and samples[7]["sr"].shape == () and int(samples[7]["sr"]) == 16000


def test_int64_bool_and_scalar_inputs(tmp_path):
    samples = [{"x": _f32(16), "ids": RNG.integers(0, 10, 4), "flag": np.array(i % 2 == 0),
                "gain": np.array(1.5, np.float32)} for i in range(20)]
    result = _export(tmp_path, graphs.mixed_inputs(), samples)
    assert result.exit_code == 0, result.output
    assert _fidelity(tmp_path)["y"] > 22.0  # measured 26.9 dB


def test_if_subgraph_reading_a_relu_keeps_it(tmp_path):
    """An If branch reads the Relu's output: the quantizer must not fold that Relu away (it did: 1.4 dB)."""
    model = graphs.unknown_rank()
    samples = [{"x": _f32(3, 8, 8)} for _ in range(20)]
    result = _export(tmp_path, model, samples)
    assert result.exit_code == 0, result.output
    assert _fidelity(tmp_path)["y"] > 35.0  # measured 42.3 dB
    int8 = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert "Relu" in {n.op_type for n in int8.graph.node}
    x = np.stack([s["x"] for s in samples])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert sqnr_db(ref, got) > 35.0


@pytest.mark.parametrize("target", ["generic-cpu", "android-nnapi"])
def test_if_on_a_bool_scalar_input_reading_the_outer_scope(tmp_path, target):
    """The flag picks a branch per sample (fed as given); the then-branch reads a Relu of the main graph: the
    int8 graph keeps the If after it (ONNX's checker, which fixing NNAPI's shapes runs, refused it before)."""
    samples = [{"x": _f32(8), "flag": np.array(i % 2 == 0)} for i in range(20)]
    result = _export(tmp_path, graphs.with_if(), samples, "--target", target)
    assert result.exit_code == 0, result.output
    assert _fidelity(tmp_path)["y"] > 26.0  # measured 32.1 dB (generic-cpu), 31.1 dB (android-nnapi)
    int8 = onnx.load(str(tmp_path / "out" / "model.onnx"))
    onnx.checker.check_model(int8)
    order = [n.op_type for n in int8.graph.node]
    assert order.index("Relu") < order.index("If")


def test_loop_with_a_scalar_trip_count(tmp_path):
    samples = [{"x": _f32(16), "steps": np.array(1 + i % 3, np.int64)} for i in range(20)]
    result = _export(tmp_path, graphs.loop_steps(), samples)
    assert result.exit_code == 0, result.output
    assert _fidelity(tmp_path)["y"] > 33.0  # measured 40.6 dB (the Loop body stays float)


@pytest.mark.parametrize("target", ["generic-cpu", "android-nnapi"])
def test_unknown_rank_input_on_dynamic_and_static_shape_targets(tmp_path, target):
    """No shape at all on the input (ONNX's checker refuses that, ONNX Runtime runs it) and a ReduceMean over
    a value of unknown rank (was ZeroDivisionError in the GlobalAveragePool rewrite); NNAPI fixes the shapes
    and converts to opset 17."""
    result = _export(tmp_path, graphs.unknown_rank(), [{"x": _f32(3, 8, 8)} for _ in range(20)], "--target", target)
    assert result.exit_code == 0, result.output
    assert _fidelity(tmp_path)["y"] > 33.0  # measured 40.6 dB (NNAPI)
    if target == "android-nnapi":
        s = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert s.get_inputs()[0].shape == [1, 3, 8, 8]


def test_symbolic_dimensions_with_a_fixed_shape(tmp_path):
    result = _export(tmp_path, graphs.symbolic_image(), [{"x": _f32(3, 12, 10)} for _ in range(20)],
                     "--target", "android-nnapi")
    assert result.exit_code == 0, result.output
    assert _fidelity(tmp_path)["y"] > 32.0  # measured 39.0 dB
    s = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert s.get_inputs()[0].shape == [1, 3, 12, 10]


BAD = {
    "sample rank fits neither form": (graphs.time_major, lambda i: {"x": _f32(5)}, (),
                                      ("'x' has shape [5]", "['?', 8] (without batch axis)", "['?', '?', 8]")),
    "state of the wrong size": (graphs.recurrent_cell, lambda i: {"x": _f32(8), "state": _f32(3, 16),
                                                                  "sr": np.array(16000)}, (),
                                ("'state' has shape [3, 16]", "[1, 16] (without batch axis)")),
    "scalar given as a vector": (graphs.mixed_inputs, lambda i: {"x": _f32(16), "ids": RNG.integers(0, 10, 4),
                                                                 "flag": np.array(True),
                                                                 "gain": np.ones(1, np.float32)}, (),
                                 ("'gain' has shape [1]", "expects a scalar")),
    "int64 ids out of range": (graphs.mixed_inputs, lambda i: {"x": _f32(16), "ids": np.full(4, 80),
                                                               "flag": np.array(True),
                                                               "gain": np.array(1.0, np.float32)}, (),
                               ("Gather", "indices element out of data bounds", "check that the data fits")),
    "a missing input": (graphs.recurrent_cell, lambda i: {"x": _f32(8), "state": _f32(1, 16)}, (),
                        ("do not match the model inputs", "'sr'")),
    "fixed shape of the wrong rank for an unknown-rank input": (
        graphs.unknown_rank, lambda i: {"x": _f32(3, 8, 8)}, ("--input-shape", "x:1,3,8"),
        ("input 'x' (rank unknown to the model)", "give 4 dimensions")),
    "fixed shape against a fixed dimension": (
        graphs.symbolic_image, lambda i: {"x": _f32(3, 8, 8)}, ("--input-shape", "x:1,4,8,8"),
        ("input 'x'", "['?', 3, '?', '?']")),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(tmp_path, case):
    build, sample, extra, needles = BAD[case]
    result = _export(tmp_path, build(), [sample(i) for i in range(8)], *extra)
    _one_line(result, *needles)
    assert not (tmp_path / "out").exists()


def test_an_op_onnx_runtime_lacks_is_one_line(tmp_path):
    model = graphs.time_major()
    model.graph.node[1].op_type, model.graph.node[1].domain = "Mystery", "my.ops"
    model.opset_import.append(onnx.helper.make_opsetid("my.ops", 1))
    result = _export(tmp_path, model, [{"x": _f32(5, 8)} for _ in range(8)])
    _one_line(result, "my.ops:Mystery", "replace that op with standard ONNX ops")


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_a_designed_minus_infinity_mask_is_no_overflow(tmp_path, method):
    # decoders (GPT-2, Llama) fill masked attention scores with -inf before the Softmax: the tensor stays float,
    # the rest is quantized, and the model is written (it was refused as an fp32 overflow)
    result = _export(tmp_path, graphs.masked_attention(), [{"x": _f32(8, 16)} for _ in range(24)], "--method", method)
    assert result.exit_code == 0, result.output
    assert min(_fidelity(tmp_path).values()) > 25.0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kernels"]["int8_nodes"] >= 3, report["kernels"]  # the projections run in int8


def test_an_overflowing_output_is_one_line(tmp_path):
    result = _export(tmp_path, graphs.infinite_output(), [{"x": _f32(8) + 1.0} for _ in range(24)])
    _one_line(result, "'y'", "NaN/Inf", "overflows")


def test_a_state_fixed_at_batch_one_fixes_the_batch():
    # a sequence model whose recurrent state is declared [1, H]: its free input follows, batches are of one
    from onnx import TensorProto
    from onnx import helper as oh

    from edgequant.calibration.streaming import fixed_batch

    def model(state_batch):
        nodes = [oh.make_node("Add", ["h", "h"], ["y"])]
        inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8]),
                  oh.make_tensor_value_info("h", TensorProto.FLOAT, [state_batch, 16])]
        return oh.make_model(oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          [state_batch, 16])]))

    assert fixed_batch(model(1), {"x": 0, "h": 0}) == 1
    assert fixed_batch(model("N"), {"x": 0, "h": 0}) is None
    assert fixed_batch(model(1), {"x": 0, "h": None}) is None  # a state fed as given fixes nothing
