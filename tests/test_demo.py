"""The embedded default end to end, at an even smaller size than `make demo` (CI covers it)."""
import hashlib
import json
import logging
import os
import pickle

from results.collect import collect

TASK_DIR = "synthetic_frcnn_fpn_1k@smoke"


def test_demo_pipeline_small(tmp_path, monkeypatch, capsys):
    from tools import demo

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo_out"
    root_handlers = list(logging.getLogger().handlers)
    assert demo.main(["--out", str(out), "--small", "--seeds", "2",
                      "--supervised-seeds", "1"]) == 0
    console = capsys.readouterr()
    # the programs it ran in this process took their logging with them: no handler left
    # writing into the run folders (a later test's log line found one closed, file gone)
    assert logging.getLogger().handlers == root_handlers
    # the quiet console: stage lines, the table and the p-values; the logs went to files
    assert len(console.out.splitlines()) < 100, console.out
    assert "Welch two-sided p-values over seeds, bbox/AP50 (the task's main metric)" in console.out
    assert "p-values over seeds, bbox/AP:" in console.out
    assert "| moco" in console.out and "GeneralizedRCNN(" not in console.out
    runs = collect(str(out / "runs"))
    assert sorted(runs["weights"]) == ["moco", "moco", "random", "random", "supervised"]
    assert set(runs["state"]) == {"complete"}, runs[["weights", "state", "reason"]]
    md = open(out / "results" / "results.md").read()
    assert "Demo: synthetic shapes" in md and "| moco" in md and "| supervised" in md
    assert os.path.exists(out / "results" / "report.html")
    ck = out / "pretrain" / "moco" / "checkpoint_last.pth.tar"
    assert ck.exists() and (out / "weights" / "moco.pkl").exists()
    # each transfer run was given the checkpoint its name says: the run records the converted
    # .pkl it loaded and the sha256 of the pretraining checkpoint that .pkl was converted from
    sources = {"moco": ck,
               "supervised": out / "pretrain" / "supervised" / "checkpoint_last.pth.tar"}
    for name, source in sources.items():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        with open(out / "weights" / f"{name}.pkl", "rb") as f:
            assert pickle.load(f)["moco_transfer"]["sha256"] == digest
        for seed in (0, 1) if name == "moco" else (0,):
            run = out / "runs" / TASK_DIR / name / f"seed{seed}"
            with open(run / "results.json") as f:
                rec = json.load(f)
            assert rec["weights_sha256"] == digest, (name, seed)
            assert rec["weights_file"] == os.path.abspath(out / "weights" / f"{name}.pkl")
            log = (run / "log.txt").read_text()  # the model printout went to the run's log
            assert "GeneralizedRCNN(" in log
    assert sources["moco"].read_bytes() != sources["supervised"].read_bytes()

    # the control's weights: random init in the MoCo checkpoint format, converted the same way,
    # give a .pkl with the same keys, shapes and metadata fields but other values
    from tools.demo import convert, random_moco_checkpoint

    fake = random_moco_checkpoint(str(ck), str(tmp_path / "random_moco.pth.tar"))
    convert(fake, str(tmp_path / "control.pkl"), str(tmp_path / "convert.txt"))
    with open(out / "weights" / "moco.pkl", "rb") as f:
        real = pickle.load(f)
    with open(tmp_path / "control.pkl", "rb") as f:
        ctrl = pickle.load(f)
    assert set(real["model"]) == set(ctrl["model"])
    assert all(real["model"][k].shape == ctrl["model"][k].shape for k in real["model"])
    assert set(real["moco_transfer"]) == set(ctrl["moco_transfer"])
    assert real["moco_transfer"]["normalization"] == ctrl["moco_transfer"]["normalization"]
    assert not (real["model"]["res2.0.conv1.weight"] == ctrl["model"]["res2.0.conv1.weight"]).all()
