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


# Cityscapes instance AP, reimplemented from its definition (cityscapesscripts'
# evalInstanceLevelSemanticLabeling, distances not available) on the matches file it writes:
# for every class with instances and every overlap threshold t in 0.50, 0.55, ..., 0.95,
# - ground truth: instances (id >= 1000, not groups) of at least 100 pixels;
# - a prediction whose IoU with a ground-truth instance exceeds t is a true positive if it has
#   the highest confidence among those, a false positive otherwise (a duplicate); one whose
#   best match is a group or a too-small instance counts as neither;
# - an unmatched prediction is a false positive unless more than t of its pixels lie on void,
#   groups or too-small instances (pixels of a small group are counted twice there, as the
#   official code does);
# - AP is the area under precision(recall), trapezoids between the points of every distinct
#   confidence threshold and the point (recall 0, precision 1);
# - a class without ground truth has no AP (NaN), one with ground truth and not a single
#   prediction has 0;
# AP is the mean over classes and thresholds of the non-NaN values, AP50 that at t = 0.5.
CITYSCAPES_MIN_REGION = 100
CITYSCAPES_OVERLAPS = [0.5 + 0.05 * i for i in range(10)]


def _iou(a, b, inter):
    return inter / (a["pixelCount"] + b["pixelCount"] - inter)


def _counted_gt(gt):
    return gt["instID"] >= 1000 and gt["pixelCount"] >= CITYSCAPES_MIN_REGION


def cityscapes_class_ap(matches, label, t):
    n_gt, any_pred = 0, False
    scored = []  # (confidence, is true positive)
    for img in matches.values():
        n_gt += sum(map(_counted_gt, img["groundTruth"][label]))
        preds = img["prediction"][label]
        any_pred = any_pred or bool(preds)
        best = {}  # ground-truth instance id -> confidences of the predictions matching it
        for p in preds:
            hit = [g for g in p["matchedGt"] if _iou(g, p, g["intersection"]) > t]
            if hit:
                if _counted_gt(hit[0]):
                    best.setdefault(hit[0]["instID"], []).append(p["confidence"])
                continue
            ignored = p["voidIntersection"] + sum(
                g["intersection"] * ((g["instID"] < 1000) + (g["pixelCount"] <
                                                             CITYSCAPES_MIN_REGION))
                for g in p["matchedGt"])
            if ignored / p["pixelCount"] <= t:
                scored.append((p["confidence"], False))
        for confs in best.values():
            confs = sorted(confs, reverse=True)
            scored += [(confs[0], True)] + [(c, False) for c in confs[1:]]
    if n_gt == 0:
        return math.nan
    if not any_pred:
        return 0.0
    points = [(0.0, 1.0)]  # (recall, precision), from the highest confidence down
    for thr in sorted({c for c, _ in scored}, reverse=True):
        tp = sum(1 for c, ok in scored if ok and c >= thr)
        fp = sum(1 for c, ok in scored if not ok and c >= thr)
        points.append((tp / n_gt, tp / (tp + fp)))
    return sum((r1 - r0) * (p0 + p1) / 2 for (r0, p0), (r1, p1) in zip(points, points[1:]))


def cityscapes_metrics(matches):
    from cityscapesscripts.helpers.labels import labels

    classes = [lab.name for lab in labels if lab.hasInstances and not lab.ignoreInEval]
    aps = [[cityscapes_class_ap(matches, c, t) for t in CITYSCAPES_OVERLAPS] for c in classes]

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) * 100 if values else math.nan

    return {"AP": mean([v for row in aps for v in row]), "AP50": mean([row[0] for row in aps])}


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


def test_coco_reported_ap_is_pycocotools_on_non_trivial_detections(tmp_path, monkeypatch):
    """The smoke runs above detect nothing right (AP 0 or NaN), which a scaled or swapped
    metric would not change. Here an evaluation-only run's model answers with jittered copies
    of the ground-truth boxes, false positives and random scores (no network involved), and
    the AP in results.json, through the harness's evaluator and record, must be pycocotools'
    on the detections it dumped, strictly between 0 and 100."""
    import numpy as np
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.structures import Boxes, Instances

    from transfer.train_net import run

    records = {r["image_id"]: r for r in DatasetCatalog.get("coco_2017_val")}
    rng = np.random.default_rng(0)

    def answer(self, batched_inputs, detected_instances=None, do_postprocess=True):
        out = []
        for x in batched_inputs:
            r = records[x["image_id"]]
            h, w = r["height"], r["width"]
            boxes = [a["bbox"] for a in r["annotations"] if not a.get("iscrowd", 0)]
            classes = [a["category_id"] for a in r["annotations"] if not a.get("iscrowd", 0)]
            boxes = [[bx + dx, by + dy, bx + bw * sw, by + bh * sh]
                     for (bx, by, bw, bh), (dx, dy, sw, sh) in zip(
                         boxes, rng.uniform([-8, -8, 0.8, 0.8], [8, 8, 1.2, 1.2],
                                            (len(boxes), 4)))]
            boxes += [[w * 0.1, h * 0.1, w * 0.4, h * 0.5]] * 2  # false positives
            classes += [0, 17]
            inst = Instances((h, w), pred_boxes=Boxes(torch.tensor(boxes).reshape(-1, 4)),
                             scores=torch.tensor(rng.uniform(0.05, 1, len(boxes)),
                                                 dtype=torch.float32),
                             pred_classes=torch.tensor(classes, dtype=torch.int64))
            out.append({"instances": inst})
        return out

    monkeypatch.setattr(GeneralizedRCNN, "inference", answer)
    run(["--task", "coco_mask_fpn_1x", "--weights", "random", "--scale", "smoke",
         "--runs", str(tmp_path), "--eval-only"])
    out = os.path.join(tmp_path, "coco_mask_fpn_1x@smoke", "random", "seed0")
    res = read(out, "results.json")
    assert res["state"] == "complete"
    with open(os.path.join(out, "inference", "coco_2017_val", "coco_instances_results.json")) as f:
        detections = json.load(f)
    assert len(detections) == sum(
        2 + sum(not a.get("iscrowd", 0) for a in r["annotations"]) for r in records.values())
    reference = pycocotools_metrics(json_file_of("coco_2017_val"), detections, "bbox")
    assert 10 < reference["AP"] < 90 and 10 < reference["AP50"] < 100, reference
    assert_reported_equals(res["metrics"], "bbox", reference)


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
    with open(os.path.join(out, "inference", "cityscapes_fine_instance_seg_val",
                           "cityscapes_instance_matches.json")) as f:
        matches = json.load(f)
    assert len(matches) == 2  # the two val images of the fixture
    # the reported AP is the one defined on the matches cityscapesscripts wrote
    assert_reported_equals(res["metrics"], "segm", cityscapes_metrics(matches))
    # random weights match nothing (AP 0): on the same matches with the best prediction of
    # every instance made exact, the recomputation is non-zero and the official one's
    made_exact = exact_best_matches(matches)
    mine = cityscapes_metrics(made_exact)
    assert 0 < mine["AP"] < 100 and 0 < mine["AP50"] < 100, mine
    assert mine == pytest.approx(cityscapesscripts_metrics(made_exact), rel=1e-9)



def test_cityscapes_reported_ap_on_non_trivial_detections(dataset_root, tmp_path, monkeypatch):
    """The smoke run's AP is 0 (random weights match nothing), which a scaled or swapped metric
    would not change. Here an evaluation-only run's model answers the ground-truth masks, some
    shifted, with random scores, and false positives: the reported AP is the recomputation
    from the matches file, strictly inside (0, 100)."""
    import numpy as np
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.structures import Instances
    from pycocotools import mask as mask_util

    from tools.fixtures.cityscapes_voc import write_cityscapes
    from transfer.train_net import run

    write_cityscapes(dataset_root)
    name = "cityscapes_fine_instance_seg_val"
    records = {r["file_name"]: r for r in DatasetCatalog.get(name)}
    rng = np.random.default_rng(0)

    def answer(self, batched_inputs, detected_instances=None, do_postprocess=True):
        out = []
        for x in batched_inputs:
            r = records[x["file_name"]]
            h, w = r["height"], r["width"]
            masks, classes = [], []
            for a in r["annotations"]:
                m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(
                    a["segmentation"], h, w))).astype(bool)
                masks.append(np.roll(m, int(rng.integers(0, 12)), axis=1))  # IoU 1 to ~0.6
                classes.append(a["category_id"])
            fp = np.zeros((h, w), bool)
            fp[5:40, 5:60] = True  # on the sky: a false positive of every class
            masks += [fp] * 3
            classes += [0, 1, 2]
            out.append({"instances": Instances(
                (h, w), pred_masks=torch.tensor(np.stack(masks)),
                pred_classes=torch.tensor(classes, dtype=torch.int64),
                scores=torch.tensor(rng.uniform(0.1, 1, len(masks)), dtype=torch.float32))})
        return out

    monkeypatch.setattr(GeneralizedRCNN, "inference", answer)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run(["--task", "cityscapes_mask_fpn_24k", "--weights", "random", "--scale", "smoke",
         "--runs", str(tmp_path), "--eval-only"])
    out = os.path.join(tmp_path, "cityscapes_mask_fpn_24k@smoke", "random", "seed0")
    res = read(out, "results.json")
    with open(os.path.join(out, "inference", name, "cityscapes_instance_matches.json")) as f:
        matches = json.load(f)
    assert len(matches) == len(records)
    reference = cityscapes_metrics(matches)
    assert 0 < reference["AP"] < 100 and 0 < reference["AP50"] < 100, reference
    assert_reported_equals(res["metrics"], "segm", reference)


def exact_best_matches(matches):
    """A copy of `matches` where, on every image, the most confident prediction overlapping
    each ground-truth instance covers exactly that instance's pixels."""
    matches = copy.deepcopy(matches)
    for img in matches.values():
        for label, gts in img["groundTruth"].items():
            for gt in gts:
                if not gt["matchedPred"]:
                    continue
                best = max(gt["matchedPred"], key=lambda p: p["confidence"])
                for p in gt["matchedPred"] + img["prediction"][label]:
                    if p["predID"] == best["predID"]:
                        p["pixelCount"] = gt["pixelCount"]
                        p["voidIntersection"] = 0
                        p["intersection"] = gt["pixelCount"]
                        for g in p.get("matchedGt", []):
                            if g["instID"] == gt["instID"]:
                                g["intersection"] = gt["pixelCount"]
    return matches


def cityscapesscripts_metrics(matches):
    """cityscapesscripts' own AP and AP50 on a matches dict (as detectron2 reports them)."""
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    args = copy.copy(cs_eval.args)
    cs_eval.setInstanceLabels(args)
    averages = cs_eval.computeAverages(cs_eval.evaluateMatches(matches, args), args)
    return {"AP": averages["allAp"] * 100, "AP50": averages["allAp50%"] * 100}


def _instance(inst_id, pixels):
    return {"instID": inst_id, "labelID": inst_id // 1000, "pixelCount": pixels,
            "medDist": -1, "distConf": 0.0}


def hand_matches():
    """One image in cityscapesscripts' matches format. car: instances A and B of 1000 pixels
    and one of 50 (too small to count); predictions, by confidence: 0.95 all on void (ignored),
    0.9 exactly A, 0.8 on nothing (false positive), 0.7 720 pixels inside B (IoU 0.72),
    0.5 1000 pixels 900 of which on A (IoU 0.82; a duplicate, or unmatched: false positive).
    person: one instance, no prediction (AP 0). truck: a prediction, no instance (no AP)."""
    from cityscapesscripts.helpers.labels import labels

    names = [lab.name for lab in labels if lab.hasInstances and not lab.ignoreInEval]
    gt = {n: [] for n in names}
    pred = {n: [] for n in names}
    gt["car"] = [dict(_instance(26000, 1000), matchedPred=[]),
                 dict(_instance(26001, 1000), matchedPred=[]),
                 dict(_instance(26002, 50), matchedPred=[])]
    gt["person"] = [dict(_instance(24000, 800), matchedPred=[])]
    cars = [(0.95, 400, 400, None, 0), (0.9, 1000, 0, 0, 1000), (0.8, 500, 0, None, 0),
            (0.7, 720, 0, 1, 720), (0.5, 1000, 0, 0, 900)]
    for i, (conf, pixels, void, on, inter) in enumerate(cars):
        p = {"imgName": "x.png", "predID": i, "labelID": 26, "pixelCount": pixels,
             "confidence": conf, "voidIntersection": void}
        p["matchedGt"] = [] if on is None else [
            dict({k: v for k, v in gt["car"][on].items() if k != "matchedPred"},
                 intersection=inter)]
        if on is not None:
            gt["car"][on]["matchedPred"].append(dict(p, intersection=inter))
            del gt["car"][on]["matchedPred"][-1]["matchedGt"]
        pred["car"].append(p)
    pred["truck"] = [{"imgName": "y.png", "predID": 5, "labelID": 27, "pixelCount": 300,
                      "confidence": 0.99, "voidIntersection": 0, "matchedGt": []}]
    return {"/gt/x_gtFine_instanceIds.png": {"groundTruth": gt, "prediction": pred}}


def test_cityscapes_ap_recomputation_on_a_hand_made_case():
    # car: at t <= 0.70 B's prediction is a true positive: the points (recall, precision)
    # (0, 1) (.5, 1) (.5, .5) (1, 2/3) (1, .5) enclose 1/2 + 1/2 (1/2 + 2/3) / 2 = 19/24;
    # above, B is missed: (0, 1) (.5, 1) (.5, .5) (.5, 1/3) (.5, 1/4) enclose 1/2.
    # Five thresholds each: car 31/48; person 0; truck none.
    car = (5 * 19 / 24 + 5 * 1 / 2) / 10
    expected = {"AP": (car + 0) / 2 * 100, "AP50": (19 / 24 + 0) / 2 * 100}
    matches = hand_matches()
    assert cityscapes_metrics(matches) == pytest.approx(expected, rel=1e-12)
    assert cityscapesscripts_metrics(matches) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(cityscapes_class_ap(matches, "truck", 0.5))
