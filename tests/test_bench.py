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
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
        assert r["throughput_per_s"] > 0 and r["spread"] >= 0
        assert 0.5 < r["peak_memory_mib"] < 500, r  # session + weights + arena of a 100 KB model
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
