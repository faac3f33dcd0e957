"""Real smoke runs of the harness on the shared samples: train from a converted checkpoint,
evaluate with the real evaluators, resume, dry-run, and LVIS evaluation."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from tests.conftest import ROOT, requires_shared

pytestmark = requires_shared


@pytest.fixture(scope="module")
def moco_pkl(tmp_path_factory):
    from convert.to_detectron2 import convert, write_atomic

    torch.manual_seed(0)
    sd = torchvision.models.resnet50(num_classes=128).state_dict()
    tmp = tmp_path_factory.mktemp("weights")
    torch.save({"epoch": 1, "arch": "resnet50",
                "state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}},
               tmp / "moco_r50.pth.tar")
    out, _ = convert(str(tmp / "moco_r50.pth.tar"))
    write_atomic(out, str(tmp / "moco_r50.pkl"))
    return str(tmp / "moco_r50.pkl")


def transfer(task, weights, runs, *opts):
    from transfer.train_net import run

    run(["--task", task, "--weights", weights, "--scale", "smoke", "--runs", str(runs),
         *opts])
    return os.path.join(str(runs), f"{task}@smoke", os.path.basename(weights).split(".")[0],
                        "seed0")


def read(path, name):
    with open(os.path.join(path, name)) as f:
        return json.load(f)


def train_iterations(path):
    with open(os.path.join(path, "metrics.json")) as f:
        return [json.loads(line) for line in f if '"total_loss"' in line]


def test_voc_c4_trains_from_converted_checkpoint_evaluates_and_resumes(moco_pkl, tmp_path):
    out = transfer("voc_frcnn_c4_24k", moco_pkl, tmp_path, "SOLVER.MAX_ITER", "4")
    res = read(out, "results.json")
    assert res["state"] == "complete" and res["weights"] == "moco_r50"
    assert set(res["metrics"]) >= {"bbox/AP", "bbox/AP50", "bbox/AP75"}
    assert all(0 <= v <= 100 for v in res["metrics"].values())
    assert res["protocol"]["max_iter"] == 4 and res["protocol"]["scale"] == "smoke"
    assert res["weights_sha256"]
    iters = [m["iteration"] for m in train_iterations(out)]
    assert iters[-1] == 3 and all(m["total_loss"] < 100 for m in train_iterations(out))
    cfg_text = open(os.path.join(out, "config.yaml")).read()
    assert "Res5ROIHeadsExtraNorm" in cfg_text and "FORMAT: RGB" in cfg_text

    # simulate a kill after iteration 2: only the mid-run checkpoint survives
    os.remove(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    os.remove(os.path.join(out, "metrics.json"))
    transfer("voc_frcnn_c4_24k", moco_pkl, tmp_path, "SOLVER.MAX_ITER", "4")
    assert [m["iteration"] for m in train_iterations(out)] == [2, 3]  # resumed at iteration 2
    assert read(out, "results.json")["state"] == "complete"


@pytest.mark.parametrize("task,metrics", [
    ("coco_mask_fpn_1x", {"bbox/AP", "segm/AP", "segm/AP50"}),
    ("coco_kp_fpn_2x", {"bbox/AP", "keypoints/AP"}),
])
def test_coco_tasks_train_and_evaluate(moco_pkl, tmp_path, task, metrics):
    out = transfer(task, moco_pkl, tmp_path, "SOLVER.MAX_ITER", "3")
    res = read(out, "results.json")
    assert res["state"] == "complete"
    assert metrics <= set(res["metrics"])
    assert os.path.exists(os.path.join(out, "inference", "coco_instances_results.json")) or \
        os.path.isdir(os.path.join(out, "inference"))


def test_lvis_evaluation_runs(tmp_path):
    from transfer.train_net import run

    run(["--task", "lvis_mask_fpn_1x", "--weights", "random", "--scale", "smoke",
         "--runs", str(tmp_path), "--eval-only", "DATASETS.TRAIN", "('lvis_v0.5_val',)"])
    res = read(os.path.join(tmp_path, "lvis_mask_fpn_1x@smoke", "random", "seed0"),
               "results.json")
    assert {"bbox/AP", "segm/AP", "segm/APr"} <= set(res["metrics"])


def test_missing_dataset_stops_before_training_with_layout(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "nothing"))
    res = subprocess.run([sys.executable, "-m", "transfer.train_net", "--task",
                          "coco_mask_fpn_2x", "--scale", "smoke", "--runs", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode != 0
    assert "coco/annotations/instances_{train,val}2017.json" in res.stderr
    assert str(tmp_path / "nothing") in res.stderr
    assert not os.path.exists(tmp_path / "coco_mask_fpn_2x@smoke")


def test_dry_run_prints_resolved_config_and_unknown_task_lists_tasks(tmp_path):
    res = subprocess.run([sys.executable, "-m", "transfer.train_net", "--task", "voc_frcnn_c4_24k",
                          "--weights", "supervised", "--dry-run"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "MAX_ITER: 24000" in res.stdout and "FORMAT: BGR" in res.stdout
    res = subprocess.run([sys.executable, "-m", "transfer.train_net", "--task", "nope"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "coco_mask_fpn_2x" in res.stderr


def test_cityscapes_instance_task_on_generated_fixture(dataset_root, tmp_path, monkeypatch):
    from tests.fixtures import write_cityscapes
    from transfer.train_net import run

    write_cityscapes(dataset_root)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run(["--task", "cityscapes_mask_fpn_24k", "--weights", "random", "--scale", "smoke",
         "--runs", str(tmp_path), "SOLVER.MAX_ITER", "2"])
    out = os.path.join(tmp_path, "cityscapes_mask_fpn_24k@smoke", "random", "seed0")
    res = read(out, "results.json")
    assert res["state"] == "complete"
    assert {"segm/AP", "segm/AP50"} <= set(res["metrics"])  # cityscapesscripts' evaluation
    # cityscapesscripts' matches.json goes to the run, not the directory the run started in
    assert not os.listdir(cwd)
    assert os.path.isfile(os.path.join(out, "inference", "cityscapes_fine_instance_seg_val",
                                       "cityscapes_instance_matches.json"))
