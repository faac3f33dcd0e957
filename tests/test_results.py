"""Results: numbers against hand-computed values, failed/missing/different-protocol runs, the
suite planner, and one real smoke suite end to end."""
import json
import os

import numpy as np
import pytest

from results.__main__ import main as results_main
from results.collect import collect
from tools.suite import main as suite_main, plan
from results.tables import build_tables, format_cell, Stat, welch_p
from tests.conftest import requires_shared

PROTOCOL = {"max_iter": 24000, "steps": [18000, 22000], "ims_per_batch": 16, "base_lr": 0.02,
            "warmup_iters": 100, "norm": "naiveSyncBN", "min_size_train": [480, 800],
            "min_size_test": 800, "scale": "full", "deviations": []}
METRICS = ["bbox/AP50", "bbox/AP", "bbox/AP75"]
PAPER_TABLE = "Table 2b: VOC, Faster R-CNN R50-C4"  # as the harness records it (run_dir.run_record)


def write_run(root, weights, seed, metrics=None, state="complete", reason="", protocol=None,
              task="voc_frcnn_c4_24k"):
    d = os.path.join(root, task, weights, f"seed{seed}")
    os.makedirs(d, exist_ok=True)
    rec = {"task": task, "weights": weights, "seed": seed, "scale": "full", "state": state,
           "protocol": protocol or PROTOCOL, "metrics_wanted": METRICS,
           "paper_table": PAPER_TABLE}
    if state == "complete":
        rec["metrics"] = metrics
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(rec, f)
    else:
        rec["reason"] = reason
    with open(os.path.join(d, "status.json"), "w") as f:
        json.dump(rec, f)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        for it in range(3):
            f.write(json.dumps({"iteration": it, "total_loss": 3.0 - it * 0.5 - seed * 0.1}) + "\n")
    return d


def m(ap50, ap, ap75):
    return {"bbox/AP50": ap50, "bbox/AP": ap, "bbox/AP75": ap75}


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "runs")
    for seed, v in enumerate([80.0, 81.0, 82.0]):
        write_run(root, "supervised", seed, m(v, 50.0 + seed, 55.0))
    for seed, v in enumerate([83.0, 84.0]):  # seed 2 missing
        write_run(root, "moco", seed, m(v, 50.5 + seed, 60.0))
    write_run(root, "moco", 3, state="diverged", reason="FloatingPointError: Loss became NaN")
    write_run(root, "random", 0, m(60.0, 33.0, 33.0))
    write_run(root, "random", 1, m(99.0, 99.0, 99.0), protocol=dict(PROTOCOL, max_iter=12000))
    return root


def test_statistics_match_hand_computed_values():
    sup, moco = Stat([80.0, 81.0, 82.0]), Stat([83.0, 84.0])
    assert (sup.mean, sup.std, sup.n) == (81.0, 1.0, 3)
    assert moco.mean == 83.5 and moco.std == pytest.approx(0.7071068, abs=1e-6)
    # Welch, written out: t = 2.5 / sqrt(1/3 + 0.5/2); Welch-Satterthwaite df
    from scipy.stats import t as student_t

    v1, v2 = 0.5 / 2, 1.0 / 3
    t = 2.5 / (v1 + v2) ** 0.5
    df = (v1 + v2) ** 2 / (v1 ** 2 / 1 + v2 ** 2 / 2)
    assert t == pytest.approx(3.2733, abs=1e-4) and df == pytest.approx(2.8824, abs=1e-4)
    p = 2 * student_t.sf(t, df)
    assert welch_p(moco.values, sup.values) == pytest.approx(p, rel=1e-9)
    assert p == pytest.approx(0.0494, abs=1e-3)
    assert format_cell(moco, sup) == "83.5 ± 0.7 (2) (+2.5*)"
    assert format_cell(Stat([81.5, 80.5]), sup) == "81.0 ± 0.7 (2) (+0.0)"
    big = Stat([90.0, 91.0, 92.0])
    assert welch_p(big.values, sup.values) < 0.05
    assert format_cell(big, sup) == "91.0 ± 1.0 (3) (+10.0*)"
    assert format_cell(Stat([60.0]), sup) == "60.0 (1) (-21.0)"


def test_tables_from_a_run_tree(tree):
    tables = build_tables(collect(tree))
    assert len(tables) == 2  # the 12000-iteration run is never averaged with the others
    main, other = tables
    frame = main.frame()
    assert list(frame.columns) == METRICS
    assert frame.loc["supervised", "bbox/AP50"] == "81.0 ± 1.0 (3)"
    assert frame.loc["moco", "bbox/AP50"] == "83.5 ± 0.7 (2) (+2.5*)"
    assert frame.loc["moco", "bbox/AP"] == "51.0 ± 0.7 (2) (+0.0)"  # 50.5, 51.5 vs 50, 51, 52
    assert frame.loc["moco", "bbox/AP75"] == "60.0 ± 0.0 (2) (+5.0*)"  # exact, 0 spread
    assert frame.loc["random init", "bbox/AP50"] == "60.0 (1) (-21.0)"
    # the paper's rows carry their delta to the paper's supervised row, as the paper prints it
    assert frame.loc["paper: MoCo IN-1M", "bbox/AP"] == "55.9 (+2.4)"  # 55.9 - 53.5
    assert frame.loc["paper: supervised IN-1M", "bbox/AP"] == "53.5"
    assert frame.loc["paper: random init", "bbox/AP50"] == "60.2 (-21.1)"  # 60.2 - 81.3
    assert frame.loc["paper (MoCHi): MoCHi (256, 512, 0) 200ep", "bbox/AP50"] == \
        "82.8 ± 0.2 (+1.5)"  # 82.8 - 81.3
    notes = "\n".join(main.notes())
    assert "moco / seed 3: diverged (FloatingPointError: Loss became NaN)" in notes
    assert "24000 iterations" in notes and "global batch 16" in notes and "ddof=1" in notes
    assert "protocol variant 2" in other.title
    assert other.frame().loc["random init", "bbox/AP50"] == "99.0 (1)"
    assert "12000 iterations" in "\n".join(other.notes())


def test_make_results_writes_every_format(tree, tmp_path):
    out = str(tmp_path / "out")
    assert results_main(["--runs", tree, "--out", out]) == 0
    names = sorted(os.listdir(out))
    for ext in ("md", "csv", "tex"):
        assert any(n.endswith("." + ext) and n.startswith("table_2b") for n in names)
    html = open(os.path.join(out, "report.html")).read()
    assert "83.5 ± 0.7 (2) (+2.5*)" in html and "diverged" in html and "<img" in html
    raw = open(os.path.join(out, "runs.csv")).read()
    assert "moco,1,bbox/AP50,84.0" in raw
    assert os.path.exists(os.path.join(out, "plots", "voc_frcnn_c4_24k_full_loss.png"))
    linear = open(os.path.join(out, "paper_linear_top1.md")).read()  # the published reference
    assert "| MoCHi (256, 512, 0) 200ep | 67.7 |" in linear and "| m=0 | - |" in linear


def test_suite_planner_skip_resume_start_and_dry_run(tree, capsys):
    planned = plan(["voc_frcnn_c4_24k"], ["moco=m.pkl", "supervised"], [0, 2, 3], "full", tree)
    actions = {(p.weights_name, p.seed): p.action for p in planned}
    assert actions == {("moco", 0): "skip", ("moco", 2): "start", ("moco", 3): "resume",
                       ("supervised", 0): "skip", ("supervised", 2): "skip",
                       ("supervised", 3): "start"}
    assert suite_main(["--tasks", "voc_frcnn_c4_24k", "--weights", "moco=m.pkl supervised",
                       "--seeds", "0,2,3", "--runs", tree, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 to start, 1 to resume, 3 complete" in out
    assert not os.path.exists(os.path.join(tree, "voc_frcnn_c4_24k", "moco", "seed2"))


@requires_shared
def test_real_smoke_suite_two_weights_two_seeds_end_to_end(tmp_path):
    import torch
    import torchvision

    from convert.to_detectron2 import convert, write_atomic

    torch.manual_seed(0)
    sd = torchvision.models.resnet50().state_dict()
    torch.save({"arch": "resnet50", "state_dict": {f"module.encoder_q.{k}": v
                                                   for k, v in sd.items()}}, tmp_path / "m.pth")
    obj, _ = convert(str(tmp_path / "m.pth"))
    write_atomic(obj, str(tmp_path / "m.pkl"))
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    args = ["--tasks", "voc_frcnn_dc5_24k", "--weights", f"moco={tmp_path / 'm.pkl'} random",
            "--seeds", "2", "--scale", "smoke", "--runs", runs, "SOLVER.MAX_ITER", "2"]
    assert suite_main(args) == 0
    assert results_main(["--runs", runs, "--out", out]) == 0
    runs_df = collect(runs)
    assert sorted(runs_df["state"]) == ["complete"] * 4
    frame = build_tables(runs_df)[0].frame()
    assert list(frame.index) == ["random init", "moco"]
    assert all(frame.loc[w, "bbox/AP50"].split(" (")[-1].startswith("2)")
               for w in ("random init", "moco"))
    assert "Table 2a" in open(os.path.join(out, "results.md")).read()
    # the seed is a real axis: for each weights the two seeds start from different losses
    for weights in ("moco", "random"):
        first = []
        for seed in (0, 1):
            with open(os.path.join(runs, "voc_frcnn_dc5_24k@smoke", weights, f"seed{seed}",
                                   "metrics.json")) as f:
                losses = [json.loads(line) for line in f if '"total_loss"' in line]
            assert losses[0]["iteration"] == 0
            first.append(losses[0]["total_loss"])
        assert first[0] != first[1], (weights, first)
    assert os.path.exists(os.path.join(out, "report.html"))
    assert suite_main(args + ["--dry-run"]) == 0  # complete runs are now skipped


def test_suite_jobs_runs_n_at_a_time_each_with_its_share_of_the_cores(tmp_path, monkeypatch):
    """--jobs N: at most N runs at once, all of them run, a failed one is counted, and each run
    gets the cores divided by N (--threads), shared in turn by its --num-gpus processes."""
    import sys

    from tools import suite
    from transfer.console import Console

    log = tmp_path / "log"
    script = ("import os, sys, time; t0 = time.time(); time.sleep(0.6); "
              f"open({str(log)!r}, 'a').write('%s %f %f %s\\n' % (sys.argv[1], t0, time.time(), "
              "' '.join(sys.argv[2:]))); sys.exit(3 if sys.argv[1] == '2' else 0)")

    real = suite.PlannedRun.command  # what train_net would be given

    def command(self, runs_root, num_gpus=1, extra=(), threads=None, flags=()):
        argv = real(self, runs_root, num_gpus, extra, threads, flags)
        return [sys.executable, "-c", script, str(self.seed),
                *argv[argv.index("--num-gpus"):argv.index("--num-gpus") + 4]]

    monkeypatch.setattr(suite.PlannedRun, "command", command)
    monkeypatch.setattr(suite, "cpu_count", lambda: 4)
    for quiet in (False, True):
        log.write_text("")
        planned = plan(["voc_frcnn_c4_24k"], ["random"], [0, 1, 2, 3, 4], "smoke",
                       str(tmp_path / f"runs{quiet}"))
        assert suite.run_local(planned, str(tmp_path / "runs"), num_gpus=2, jobs=2,
                               console=Console(quiet=quiet)) == 1
        rows = [line.split() for line in log.read_text().splitlines()]
        assert sorted(int(r[0]) for r in rows) == [0, 1, 2, 3, 4]  # seed 2 failed, counted
        # 4 cores / 2 jobs = 2 threads per run, for its 2 processes
        assert {tuple(r[3:]) for r in rows} == {("--num-gpus", "2", "--threads", "2")}
        spans = [(float(r[1]), float(r[2])) for r in rows]
        at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        assert at_once == 2, spans  # two at a time, never three
    assert [s.threads for s in suite.local_slots(1, 1)] == [4]
    assert [s.threads for s in suite.local_slots(3, 1, threads=12)] == [4, 4, 4]


def test_a_table_holds_several_methods_each_with_p_values_against_both_baselines(tmp_path):
    """Rows named by the weights (--weights "moco_v2=a.pkl mochi_256_512_0=b.pkl supervised
    random"), each with its delta to supervised, its p-values against random init and
    supervised (Welch written out), and MoCHi's published VOC rows beside the MoCo paper's."""
    from scipy.stats import t as student_t

    root = str(tmp_path / "runs")
    values = {"random": [60.0, 62.0, 61.0], "supervised": [80.0, 81.0, 82.0],
              "moco_v2": [82.0, 83.0, 83.5], "mochi_256_512_0": [83.0, 84.5, 84.0]}
    for w, vs in values.items():
        for seed, v in enumerate(vs):
            write_run(root, w, seed, m(v, v - 25, v - 20))
    table, = build_tables(collect(root))
    frame = table.frame()
    assert list(frame.index[:4]) == ["random init", "supervised", "mochi_256_512_0", "moco_v2"]
    assert frame.loc["mochi_256_512_0", "bbox/AP50"] == "83.8 ± 0.8 (3) (+2.8*)"

    def welch(a, b):  # written out: t, Welch-Satterthwaite df, two-sided p
        va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
        t = (np.mean(a) - np.mean(b)) / (va + vb) ** 0.5
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        return 2 * student_t.sf(abs(t), df)

    line = next(n for n in table.notes() if n.startswith("p-values") and "bbox/AP50" in n)
    for w in ("moco_v2", "mochi_256_512_0"):
        for base, label in (("random", "random init"), ("supervised", "supervised")):
            assert f"{w} - {label} " in line and \
                f"p = {welch(values[w], values[base]):.3g}" in line
    sup = welch(values["supervised"], values["random"])
    assert f"supervised - random init +20.0 [95% CI " in line and f"p = {sup:.3g}" in line
    assert line.count("p = ") == 5  # 2 methods x 2 baselines + supervised/random once
    # the published rows on this task: the MoCo paper's, then MoCHi's with epochs and (N, s, s')
    assert frame.loc["paper: MoCo v2 200ep", "bbox/AP50"] == "82.4 (+1.1)"
    assert frame.loc["paper (MoCHi): MoCHi (256, 512, 0) 200ep", "bbox/AP50"] == \
        "82.8 ± 0.2 (+1.5)"
    assert frame.loc["paper (MoCHi): MoCo-v2 (reproduced) 100ep", "bbox/AP75"] == \
        "59.1 ± 0.3 (+0.3)"  # 59.1 - 58.8
