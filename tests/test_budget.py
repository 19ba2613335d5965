"""Accuracy budget: parsing, the search for the fewest float nodes, and the errors a user can hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edgequant
from edgequant.check.budget import AccuracyBudget
from edgequant.cli import cli
from edgequant.errors import BudgetError, DataError
from edgequant.check.fidelity import fidelity

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "digits" / "data"
DW = f"{ROOT / 'examples' / 'digits_dw' / 'model.py'}:build"
DIGITS = f"{ROOT / 'examples' / 'digits' / 'model.py'}:build"


@pytest.mark.parametrize("text, metric, op, bound", [
    ("cosine>=0.995", "cosine", ">=", 0.995), (" top1-drop <= 0.5 ", "top1-drop", "<=", 0.5),
    ("SQNR>=25", "sqnr", ">=", 25.0), ("argmax>=99.5", "argmax", ">=", 99.5), ("top1>=1e2", "top1", ">=", 100.0)])
def test_parse(text, metric, op, bound):
    b = AccuracyBudget.parse(text)
    assert (b.metric, b.op, b.bound) == (metric, op, bound)


@pytest.mark.parametrize("text, words", [
    ("cosine 0.995", "is not METRIC>=NUMBER"), ("cosine>=", "is not METRIC>=NUMBER"), ("", "is not"),
    ("accuracy>=0.9", "unknown accuracy metric 'accuracy'"), ("cosine<=0.99", "write cosine>=0.99"),
    ("top1-drop>=0.5", "write top1-drop<=0.5")])
def test_parse_rejects(text, words):
    with pytest.raises(BudgetError, match=words):
        AccuracyBudget.parse(text)


def test_cli_bad_budget_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(cli, ["export", DIGITS, "--calibrate", str(DATA), "-o", str(tmp_path / "b"),
                                   "--accuracy-budget", "cosine=>0.99"])
    assert res.exit_code == 2 and "--accuracy-budget" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def dw_budget(tmp_path_factory):
    """digits_dw under a budget that all-int8 misses (its held-out cosine is 0.99986)."""
    out = tmp_path_factory.mktemp("budget") / "dw"
    return edgequant.export(DW, DATA, out=out, accuracy_budget="cosine>=0.99995", progress=False)


def test_budget_keeps_few_sensitive_nodes_in_float(dw_budget):
    rep = dw_budget.report["accuracy_budget"]
    assert rep["all_int8_value"] < 0.99995 and rep["met"] and rep["value"] >= 0.99995
    # decided on the lower end of the 95% bootstrap interval over the held-out samples, not the point value
    lo, hi = rep["interval"]
    assert rep["decided_on"] == "lower" and 0.99995 <= lo <= rep["value"] <= hi and rep["samples"] == 60
    assert rep["all_int8_interval"][0] < rep["all_int8_value"] < rep["all_int8_interval"][1]
    names = [f["node"] for f in rep["float_nodes"]]
    assert 1 <= len(names) < rep["candidates"] // 2 + 2
    gains = [f["sqnr_gain_db"] for f in rep["float_nodes"]]
    assert gains == sorted(gains, reverse=True) and gains[0] > 0.3
    # independent check: the written int8 model meets the budget against the written fp32 model
    int8, fp32 = onnx.load(str(dw_budget.model_path)), onnx.load(str(dw_budget.fp32_model_path))
    macs = {n.name for n in fp32.graph.node if n.op_type in ("Conv", "Gemm")}
    still_float = {k.split(":", 1)[1] for k in dw_budget.report["kernels"]["float_compute"]}
    # every MAC ONNX Runtime leaves in float is one the search chose (a chosen Conv between quantized neighbours
    # can still be fused by ONNX Runtime: its exclusion changes the QDQ around it, not its kernel)
    assert still_float and still_float <= macs & set(names)
    assert fidelity(fp32, int8, [{"x": x} for x in np.stack([np.load(p) for p in sorted(DATA.glob("*.npy"))])[4::5]]
                    )[0].cosine >= 0.99995
    assert dw_budget.report["fidelity"][0]["cosine"] >= 0.99995
    lat = rep["latency"]
    assert lat["p50_ms"]["mixed"] > 0 and lat["runs"] == 30


def test_budget_with_labels_through_the_cli(tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.load(ROOT / "examples" / "digits" / "labels.npy"))
    res = CliRunner().invoke(cli, ["export", DIGITS, "--calibrate", str(DATA), "-o", str(tmp_path / "b"),
                                   "--accuracy-budget", "top1-drop<=0", "--labels", str(labels), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "budget   top1-drop<=0: met" in res.output
    rep = edgequant.load_bundle(tmp_path / "b").report["accuracy_budget"]
    assert rep["value"] <= 0 and rep["fp32_value"] == 0


def test_budget_that_fp32_misses_writes_nothing(tmp_path):
    res = CliRunner().invoke(cli, ["export", DIGITS, "--calibrate", str(DATA), "-o", str(tmp_path / "b"),
                                   "--accuracy-budget", "sqnr>=250", "--no-progress"])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and "cannot be met even with every node in float" in res.output
    assert not (tmp_path / "b").exists()


def test_metric_that_raises_is_named(tmp_path, digits_split):
    def my_metric(ref, test, labels):
        return 1 / 0

    with pytest.raises(BudgetError, match=r"my_metric\(\) raised ZeroDivisionError"):
        edgequant.export(DIGITS, DATA, out=tmp_path / "b", num_samples=20, progress=False,
                         accuracy_budget=AccuracyBudget(my_metric, ">=", 0.5))
    assert not (tmp_path / "b").exists()


def test_custom_metric_and_label_errors(tmp_path):
    def mean_abs_error(ref, test, labels):
        return float(np.mean(np.abs(ref["linear"] - test["linear"])))

    # all-int8 misses this bound (mean |error| about 0.05 on the digits), so the search must keep nodes in float
    b = edgequant.export(DIGITS, DATA, out=tmp_path / "b", num_samples=40, progress=False,
                         accuracy_budget=AccuracyBudget(mean_abs_error, "<=", 0.03))
    rep = b.report["accuracy_budget"]
    assert rep["budget"] == "mean_abs_error<=0.03" and rep["met"]
    assert rep["all_int8_value"] > 0.03 >= rep["value"] and rep["float_nodes"]
    int8, fp32 = onnx.load(str(b.model_path)), onnx.load(str(b.fp32_model_path))  # independent check
    held = [{"x": x} for x in np.stack([np.load(p) for p in sorted(DATA.glob("*.npy"))])[4::5]]
    from edgequant.check.budget import run_outputs

    assert mean_abs_error(run_outputs(fp32, held), run_outputs(int8, held), None) <= 0.03
    with pytest.raises(BudgetError, match="needs labels"):
        edgequant.export(DIGITS, DATA, out=tmp_path / "c", num_samples=20, progress=False,
                         accuracy_budget="top1>=90")
    with pytest.raises(DataError, match="labels hold 3 entries but there are 300 samples"):
        edgequant.export(DIGITS, DATA, out=tmp_path / "c", num_samples=20, progress=False,
                         accuracy_budget="top1>=90", labels=np.arange(3))


def test_bootstrap_interval_narrows_with_more_samples():
    from edgequant.check.budget import bootstrap_interval, resample_indices

    rng = np.random.default_rng(1)
    budget = AccuracyBudget.parse("cosine>=0.999")
    widths = []
    for n in (40, 1000):
        ref = {"y": rng.standard_normal((n, 10)).astype(np.float32)}
        test = {"y": ref["y"] + rng.standard_normal((n, 10)).astype(np.float32) * rng.uniform(0.01, 0.08, (n, 1))}
        point = budget.measure(ref, test, None)
        lo, hi = bootstrap_interval(budget, ref, test, None, resample_indices(n))
        assert lo < point < hi and budget.decisive((lo, hi)) == lo
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 5x narrower for 25x the samples
    assert AccuracyBudget.parse("top1-drop<=1").decisive((0.2, 0.9)) == 0.9
