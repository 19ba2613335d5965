"""``edgequant bench``: fields with positive numbers, ratio = int8 p50 / fp32 p50, JSON + table + plot from the
CLI, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import edgequant
from edgequant.cli import cli


@pytest.fixture(scope="module")
def digits_bench(digits_bundle):
    return edgequant.bench(digits_bundle.path, batches=(1, 4), threads=(1,), runs=20, warmup=2).to_dict()


def test_bench_fields_and_ratio(digits_bench):
    rows = digits_bench["rows"]
    assert sorted((r["model"], r["batch"]) for r in rows) == [("fp32", 1), ("fp32", 4), ("int8", 1), ("int8", 4)]
    for r in rows:
        assert r["runs"] == 20 and r["threads"] == 1
        assert r["throughput_per_s"] == pytest.approx(1000.0 * r["batch"] / r["p50_ms"], rel=1e-3)
        assert r["spread"] == pytest.approx(r["p90_ms"] / r["p50_ms"] - 1.0, abs=1e-3)
    for q in digits_bench["ratios"]:
        p50 = {r["model"]: r["p50_ms"] for r in rows if r["batch"] == q["batch"]}
        assert q["int8_over_fp32_p50"] == pytest.approx(p50["int8"] / p50["fp32"], rel=1e-4)
        assert 0 < q["paired_ratio_p10"] <= q["paired_ratio_p90"]
    assert digits_bench["environment"]["cores"] >= 1 and "peak resident memory" in digits_bench["memory_measures"]


def test_bench_a_lone_onnx(digits_bundle):
    res = edgequant.bench(digits_bundle.model_path, runs=5, warmup=1, memory=False).to_dict()
    assert [r["model"] for r in res["rows"]] == ["model"] and res["ratios"] == []
    assert res["rows"][0]["p50_ms"] > 0 and "peak_memory_mib" not in res["rows"][0]


def test_bench_cli_writes_json_and_plot(digits_bundle, tmp_path):
    out, plot = tmp_path / "b.json", tmp_path / "b.png"
    result = CliRunner().invoke(cli, ["bench", str(digits_bundle.path), "--batch", "1", "--threads", "1,2",
                                      "--runs", "10", "--no-memory", "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and len(data["ratios"]) == 2
    assert "int8/fp32 p50" in result.output and "noise" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def _one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert "Traceback" not in result.output
    return lines[-1]


def test_bench_bad_input(digits_bundle, tmp_path):
    run = CliRunner().invoke
    line = _one_line_error(run(cli, ["bench", str(digits_bundle.path), "--provider", "FooExecutionProvider"]))
    assert line.startswith("error: execution provider 'FooExecutionProvider' is not available") and \
        "CPUExecutionProvider" in line
    (tmp_path / "notes.txt").write_text("hello")
    line = _one_line_error(run(cli, ["bench", str(tmp_path / "notes.txt")]))
    assert line == f"error: {tmp_path / 'notes.txt'} is neither an edgequant bundle folder nor an .onnx file"
    line = _one_line_error(run(cli, ["bench", str(tmp_path)]))
    assert "is neither an edgequant bundle (manifest.json is missing) nor an .onnx file" in line
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    line = _one_line_error(run(cli, ["bench", str(tmp_path / "broken.onnx")]))
    assert "broken.onnx is not a valid ONNX model" in line
    for bad in ("1,x", "0", ","):
        line = _one_line_error(run(cli, ["bench", str(digits_bundle.path), "--batch", bad]), code=2)
        assert "--batch" in line and "positive integers" in line
    with pytest.raises(edgequant.BenchError, match="threads values must be positive integers"):
        edgequant.bench(digits_bundle.path, threads=(0,))


@pytest.fixture(scope="module")
def big_matmul(tmp_path_factory):
    """One MatMul with a 32 MiB float weight: its memory and time are the weight's, whatever the runtime's
    overhead, so a wrong measurement cannot hide in noise."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2048])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4096])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


_PROBE = """
import sys, time
import numpy as np, onnxruntime as ort
x = np.random.default_rng(0).standard_normal((1, 2048)).astype(np.float32)
times = []
if sys.argv[1] == "model":
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    s = ort.InferenceSession(sys.argv[2], so, providers=["CPUExecutionProvider"])
    for _ in range(25):
        t = time.perf_counter(); s.run(None, {"x": x}); times.append(time.perf_counter() - t)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(hwm, 1000 * float(np.median(times[5:])) if times else 0)
"""


def test_bench_agrees_with_an_independent_measurement(big_matmul):
    """bench's peak memory and median latency against a plain onnxruntime process measured another way (the
    whole-process high-water mark of a process that loads the model minus that of one that does not, where bench
    resets the mark after its imports; perf_counter around session.run)."""
    import subprocess
    import sys

    def probe(*args):
        out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True)
        kib, ms = out.stdout.split()
        return int(kib) / 1024, float(ms)

    without, _ = probe("none")
    with_model, ms = probe("model", str(big_matmul))
    added = with_model - without
    row = edgequant.bench(big_matmul, runs=20, warmup=3).to_dict()["rows"][0]
    assert added > 30  # the weight alone is 32 MiB
    assert abs(row["peak_memory_mib"] - added) <= 0.25 * added + 8, (row["peak_memory_mib"], added)
    assert ms / 3 <= row["p50_ms"] <= ms * 3, (row["p50_ms"], ms)  # same work, same process kind
