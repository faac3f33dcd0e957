"""The embedded default end to end, at an even smaller size than `make demo` (CI covers it)."""
import os

from results.collect import collect


def test_demo_pipeline_small(tmp_path, monkeypatch):
    from transfer import demo

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
