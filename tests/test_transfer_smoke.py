"""Real smoke runs of the harness on the shared samples: train from a converted checkpoint,
evaluate with the real evaluators, resume, dry-run, and LVIS evaluation."""
import contextlib
import copy
import io
import json
import math
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


# ---------------------------------------------------------------- reference evaluations
# The reported metrics must be what the official tools compute from the detections the run
# dumped. These call pycocotools / lvis-api / cityscapesscripts directly, whatever evaluator
# implementation the harness uses.
COCO_STATS = {"bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
              "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
              "keypoints": ("AP", "AP50", "AP75", "APm", "APl")}
LVIS_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def json_file_of(dataset_name):
    from detectron2.data import MetadataCatalog

    return MetadataCatalog.get(dataset_name).json_file


def pycocotools_metrics(gt_json, detections, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = copy.deepcopy(detections)
    if iou_type == "segm":  # mask AP uses the mask's area, not the box's
        for d in dets:
            d.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (ev.stats[i] * 100 if ev.stats[i] >= 0 else math.nan)
            for i, name in enumerate(COCO_STATS[iou_type])}


def lvis_api_metrics(gt_json, detections, iou_type):
    from lvis import LVIS, LVISEval, LVISResults

    dets = copy.deepcopy(detections)
    if iou_type == "segm":
        for d in dets:
            d.pop("bbox", None)
    gt = LVIS(gt_json)
    ev = LVISEval(gt, LVISResults(gt, dets, max_dets=300), iou_type)
    ev.run()
    res = ev.get_results()
    return {name: float(res[name] * 100) for name in LVIS_STATS}


def assert_reported_equals(reported, group, reference):
    for name, value in reference.items():
        got = reported[f"{group}/{name}"]
        if math.isnan(value):
            assert math.isnan(got), (group, name, got)
        else:
            assert got == pytest.approx(value, rel=1e-6, abs=1e-9), (group, name, got, value)


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
    # the reported AP is pycocotools' on the detections the run dumped, for every iou type
    test_set = {"coco_mask_fpn_1x": "coco_2017_val",
                "coco_kp_fpn_2x": "keypoints_coco_2017_val"}[task]
    with open(os.path.join(out, "inference", test_set, "coco_instances_results.json")) as f:
        detections = json.load(f)
    for iou_type in sorted({m.split("/")[0] for m in metrics}):
        if detections:
            reference = pycocotools_metrics(json_file_of(test_set), detections, iou_type)
        else:  # no detection: detectron2 reports NaN for every metric
            reference = {name: math.nan for name in COCO_STATS[iou_type]}
        assert_reported_equals(res["metrics"], iou_type, reference)


def test_lvis_evaluation_runs(tmp_path):
    from transfer.train_net import run

    run(["--task", "lvis_mask_fpn_1x", "--weights", "random", "--scale", "smoke",
         "--runs", str(tmp_path), "--eval-only", "DATASETS.TRAIN", "('lvis_v0.5_val',)"])
    out = os.path.join(tmp_path, "lvis_mask_fpn_1x@smoke", "random", "seed0")
    res = read(out, "results.json")
    assert {"bbox/AP", "segm/AP", "segm/APr"} <= set(res["metrics"])
    # every reported LVIS metric is lvis-api's on the dumped detections (300 per image)
    with open(os.path.join(out, "inference", "lvis_v0.5_val", "lvis_instances_results.json")) as f:
        detections = json.load(f)
    assert detections
    for iou_type in ("bbox", "segm"):
        assert_reported_equals(res["metrics"], iou_type,
                               lvis_api_metrics(json_file_of("lvis_v0.5_val"), detections,
                                                iou_type))


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
    from tools.fixtures.cityscapes_voc import write_cityscapes
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
