"""The embedded default end to end, at an even smaller size than `make demo` (CI covers it)."""
import hashlib
import json
import os
import pickle

from results.collect import collect


def test_demo_pipeline_small(tmp_path, monkeypatch):
    from tools import demo

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo_out"
    assert demo.main(["--out", str(out), "--small", "--seeds", "2"]) == 0
    runs = collect(str(out / "runs"))
    assert sorted(runs["weights"]) == ["moco", "moco", "random", "random",
                                       "supervised", "supervised"]
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
        for seed in (0, 1):
            with open(out / "runs" / "synthetic_mask_fpn_1k@smoke" / name / f"seed{seed}" /
                      "results.json") as f:
                rec = json.load(f)
            assert rec["weights_sha256"] == digest, (name, seed)
            assert rec["weights_file"] == os.path.abspath(out / "weights" / f"{name}.pkl")
    assert sources["moco"].read_bytes() != sources["supervised"].read_bytes()
