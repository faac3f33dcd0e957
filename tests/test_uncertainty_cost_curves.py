"""Issue #41 on the results side, against independent formulas: each mean's 95% interval
(Student t), each difference's Welch interval beside its p-value, the cost table and its
projection (full-size iterations only), the per-iteration curves, and an unreadable
results.json reported in the status table without a table of its own."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from results.__main__ import main as results_main
from results.collect import collect
from results.cost import cost_frame, projections, read_bench_tasks
from results.report import curve_data, smoothing_window
from results.tables import build_tables, format_difference, t_interval, welch_interval
from tests.conftest import ROOT
from tests.test_results import PROTOCOL, m, write_run

TASK = "voc_frcnn_c4_24k"


def test_t_interval_of_a_mean_against_scipy_by_hand():
    values = [80.0, 81.0, 82.0, 85.5]
    n, mean, s = len(values), np.mean(values), np.std(values, ddof=1)
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)  # t quantile at n - 1 df
    assert t_interval(values) == pytest.approx((mean - half, mean + half), rel=1e-12)
    # the same interval as scipy's own
    assert t_interval(values) == pytest.approx(
        stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(values)), rel=1e-12)
    # control: a normal quantile (or n df) would give another interval, which this test tells
    z_half = stats.norm.ppf(0.975) * s / math.sqrt(n)
    assert abs(t_interval(values)[1] - (mean + z_half)) > 0.5
    assert t_interval([3.0]) is None


def test_welch_interval_of_a_difference_against_the_formula():
    a, b = [83.0, 84.0, 86.5], [80.0, 81.0, 82.0, 81.5, 79.0]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff = np.mean(a) - np.mean(b)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    got_diff, (lo, hi) = welch_interval(a, b)
    assert got_diff == pytest.approx(diff) and (lo, hi) == pytest.approx(
        (diff - half, diff + half), rel=1e-12)
    # the interval and the p-value agree: 0 lies outside the 95% interval iff p < 0.05
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert (lo > 0) == (p < 0.05)
    assert format_difference(a, b, 2) == (f"{diff:+.2f} [95% CI {lo:+.2f}, {hi:+.2f}], "
                                          f"p = {p:.3g}")
    # control: a pooled-variance (Student) interval differs on these unequal variances
    pooled = math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1))
                       / (len(a) + len(b) - 2) * (1 / len(a) + 1 / len(b)))
    assert abs(stats.t.ppf(0.975, len(a) + len(b) - 2) * pooled - half) > 0.3


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "runs")
    for seed, v in enumerate([80.0, 81.0, 82.0]):
        write_run(root, "supervised", seed, m(v, 50.0 + seed, 55.0))
    for seed, v in enumerate([83.0, 84.0, 86.5]):
        write_run(root, "moco", seed, m(v, 51.0 + seed / 2, 60.0 + seed))
    return root


def test_tables_report_and_csv_give_each_interval(tree, tmp_path):
    table, = build_tables(collect(tree))
    notes = table.notes(2)
    lo, hi = t_interval([83.0, 84.0, 86.5])
    ci_line = next(n for n in notes if n.startswith("95% CI of each mean"))
    assert "bbox/AP50" in ci_line and f"moco 84.50 [{lo:.2f}, {hi:.2f}]" in ci_line
    slo, shi = t_interval([80.0, 81.0, 82.0])
    assert f"supervised 81.00 [{slo:.2f}, {shi:.2f}]" in ci_line
    p_line = next(n for n in notes if n.startswith("p-values") and "bbox/AP50" in n)
    assert "moco - supervised " + format_difference([83.0, 84.0, 86.5],
                                                    [80.0, 81.0, 82.0], 2) in p_line
    out = str(tmp_path / "out")
    assert results_main(["--runs", tree, "--out", out, "--decimals", "2"]) == 0
    csv = pd.read_csv(os.path.join(out, "table_2b_voc_faster_r_cnn_r50_c4_full.csv"),
                      index_col=0)
    assert csv.loc["moco", "bbox/AP50 95% CI"] == f"[{lo:.2f}, {hi:.2f}]"
    assert csv.loc["moco", "bbox/AP50"] == "84.50 ± 1.80 (3) (+3.50)"  # p = 0.0575: no *
    html = open(os.path.join(out, "report.html")).read()
    assert f"moco 84.50 [{lo:.2f}, {hi:.2f}]" in html and "95% CI" in html


@pytest.mark.parametrize("content", ['{"state": "complete", "metri', "not json at all",
                                     '[1, 2, 3]'], ids=["truncated", "not-json", "not-object"])
def test_an_unreadable_results_json_is_reported_and_makes_no_table(tree, tmp_path, content):
    bad = os.path.join(tree, TASK, "moco", "seed2")
    with open(os.path.join(bad, "results.json"), "w") as f:
        f.write(content)
    runs = collect(tree)
    row = runs[runs["path"] == bad].iloc[0]
    assert row["state"] == "unreadable" and row["reason"].startswith("results.json ")
    tables = build_tables(runs)
    assert [t.title for t in tables] == ["Table 2b: VOC, Faster R-CNN R50-C4"]
    frame = tables[0].frame()
    assert frame.loc["moco", "bbox/AP50"].endswith("(2) (+2.5*)")  # seeds 0, 1 only
    assert any("moco / seed 2: unreadable (results.json " in n for n in tables[0].notes())
    out = str(tmp_path / "out")
    assert results_main(["--runs", tree, "--out", out]) == 0
    status = pd.read_csv(os.path.join(out, "run_status.csv"))
    assert status[status["seed"] == 2].set_index("weights").loc["moco", "state"] == \
        "unreadable"
    md = open(os.path.join(out, "results.md")).read()
    assert "protocol variant" not in md and "(no runs)" not in md
    assert "completed without evaluation results" not in md
    # control: the same run with a readable file is complete and in the means
    write_run(tree, "moco", 2, m(86.5, 51.0, 62.0))
    assert collect(tree).set_index("path").loc[bad, "state"] == "complete"


def test_a_run_whose_only_files_are_unreadable_makes_no_table(tmp_path):
    root = str(tmp_path / "runs")
    write_run(root, "supervised", 0, m(80.0, 50.0, 55.0))
    lone = os.path.join(root, "voc07_frcnn_c4_9k", "moco", "seed0")  # another table
    os.makedirs(lone)
    for name in ("results.json", "status.json"):
        open(os.path.join(lone, name), "w").write("{")
    runs = collect(root)
    assert runs.set_index("path").loc[lone, "state"] == "unreadable"
    assert [t.title for t in build_tables(runs)] == [
        "Table 2b: VOC, Faster R-CNN R50-C4"]


def cost(wall_s, s_per_iter, memory, processes=1, device="CPU: test", scale="smoke"):
    return {"wall_s": wall_s, "device": device, "processes": processes,
            "device_hours": processes * wall_s / 3600, "s_per_iter": s_per_iter,
            "peak_memory_mb": memory, "scale": scale,
            "full_protocol": {"max_iter": 24000, "ims_per_batch": 16}}


def with_cost(path, record):
    for name in ("results.json", "status.json"):
        with open(os.path.join(path, name)) as f:
            rec = json.load(f)
        rec["cost"] = record
        with open(os.path.join(path, name), "w") as f:
            json.dump(rec, f)


BENCH = """# Benchmarks

## AMD EPYC, 2 cores, GPU none, torch 2.14.1+cu130, fast bf16 CPU: False

Measured 2026-11-23 21:58 with `python -m tools.bench_tasks` (`make bench-tasks`).

### One full-size training iteration per task (batch 1, CPU)

| task | train size | test size | CPU s / iter | wall s / iter | peak RSS (MB) |
|---|---|---|---|---|---|
| `voc_frcnn_c4_24k` | 800x1093, 823x800 | short 800, long <= 1333 | 62.6 | 35.4 | 5458 |
"""


def test_cost_table_means_totals_and_projection_from_full_size_iterations_only(tmp_path):
    root = str(tmp_path / "runs")
    walls = {("moco", 0): 600.0, ("moco", 1): 900.0, ("random", 0): 300.0}
    for (w, seed), wall in walls.items():
        d = write_run(root, w, seed, m(80.0 + seed, 50.0, 55.0), task=TASK + "@smoke",
                      protocol=dict(PROTOCOL, scale="smoke", max_iter=20))
        with_cost(d, cost(wall, 0.5 + seed, [1000.0 + seed, 1500.0], processes=2))
    runs = collect(root)
    frame = cost_frame(runs).set_index("task")
    row = frame.loc[TASK]
    assert row["scale"] == "smoke" and row["runs"] == 3 and row["processes"] == "2"
    assert row["wall min / run"] == pytest.approx(1800 / 3 / 60)
    assert row["device-h / run"] == pytest.approx(2 * 1800 / 3 / 3600)
    assert row["device-h, all runs"] == pytest.approx(2 * 1800 / 3600)
    assert row["s/iter"] == pytest.approx((0.5 + 1.5 + 0.5) / 3)
    assert row["peak MB / process"] == pytest.approx(1500.0)  # the largest process
    # smoke runs alone: no projection, whatever their s/iter
    assert projections(runs, {}) == {TASK: None}
    bench_md = tmp_path / "BENCHMARKS.md"
    bench_md.write_text(BENCH)
    bench = read_bench_tasks(str(bench_md))
    hours, how = projections(runs, bench)[TASK]
    assert hours == pytest.approx(35.4 * 16 * 24000 / 3600)  # batch-1 s x 16 x iterations
    assert "AMD EPYC, 2 cores" in how and "2026-11-23 21:58" in how
    # control: the smoke s/iter x the protocol's iterations would be another number
    assert hours != pytest.approx((0.5 + 1.5 + 0.5) / 3 * 24000 / 3600)
    out = str(tmp_path / "out")
    assert results_main(["--runs", root, "--out", out, "--benchmarks", str(bench_md)]) == 0
    md = open(os.path.join(out, "results.md")).read()
    assert "## Cost" in md and f"Suite total on CPU: test: 3 runs, {2 * 1800 / 3600:.4g}" in md
    assert f"{hours:.3g} device-hours, projected from `make bench-tasks`" in md
    assert "CPU: test" in open(os.path.join(out, "report.html")).read()
    assert pd.read_csv(os.path.join(out, "cost.csv"))["runs"].tolist() == [3]


def test_the_projects_bench_tasks_record_is_read():
    bench = read_bench_tasks(os.path.join(ROOT, "BENCHMARKS.md"))
    assert bench["voc_frcnn_c4_24k"].wall_s == 35.4
    assert bench["voc_frcnn_c4_24k"].machine.startswith("AMD EPYC, 2 cores")


def test_curves_hold_every_logged_iteration_raw_and_smoothed(tmp_path):
    root = str(tmp_path / "runs")
    rng = np.random.default_rng(0)
    losses = {}
    for seed in (0, 1):
        d = write_run(root, "moco", seed, m(80.0, 50.0, 55.0))
        losses[seed] = list(3.0 - np.arange(57) * 0.02 + rng.normal(0, 0.3, 57))
        with open(os.path.join(d, "metrics.json"), "w") as f:
            for it, loss in enumerate(losses[seed]):
                f.write(json.dumps({"iteration": it, "total_loss": loss}) + "\n")
            f.write(json.dumps({"iteration": 56, "bbox/AP": 1.0}) + "\n")  # evaluation line
    its, raw, smoothed = curve_data(collect(root), TASK, "full")["moco"]
    assert its == list(range(57)) and raw == [losses[0], losses[1]]
    window = smoothing_window(57)
    assert window == 5
    mean = (np.array(losses[0]) + np.array(losses[1])) / 2
    by_hand = [mean[max(0, i - 2):i + 3].mean() for i in range(57)]  # centred, 5 iterations
    assert np.allclose(smoothed, by_hand, rtol=0, atol=1e-12)
    out = str(tmp_path / "out")
    assert results_main(["--runs", root, "--out", out]) == 0
    assert os.path.getsize(os.path.join(out, "plots", f"{TASK}_full_loss.png")) > 10000
