"""Fast COCO evaluation (transfer/fast_eval.py) gives pycocotools' numbers, and the harness's
COCO evaluator goes through it.

Detections are made from the real ground truth of coco_tiny val (../shared/data) with a fixed
seed: every instance detected twice with jittered geometry and random scores, one in ten with a
wrong class, plus false positives on every image; then evaluated by pycocotools' ``COCOeval``
and by the fast path, and every summary number and the precision array compared.
"""
import contextlib
import copy
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from lvis import LVIS, LVISEval, LVISResults

from tests.conftest import SHARED_DATA, requires_shared
from transfer.d2 import has_compiled_ops
from transfer.evaluators import FasterLVISEvaluator
from transfer.fast_eval import LVIS_METRICS, FasterCOCOeval, evaluate_lvis

import detectron2.evaluation.coco_evaluation as coco_evaluation
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

COCO_ANN = os.path.join(SHARED_DATA, "coco_tiny", "annotations")
LVIS_ANN = os.path.join(SHARED_DATA, "lvis_tiny", "annotations")
LVIS_PRESENT = os.path.join(LVIS_ANN, "lvis_v0.5_val_present_images_only.json")


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def make_detections(coco, iou_type, seed=0, false_positives=5, more_on_first_image=0):
    """Two jittered detections per (non-crowd) instance, random scores, 10% with a wrong
    class, and `false_positives` random ones per image (`more_on_first_image` more on the
    first; half of them of a class the image is verified not to have, where the json says so,
    as LVIS's do), in COCO results format."""
    rng = np.random.default_rng(seed)
    cats = sorted(coco.getCatIds())
    out = []

    def geometry(d, x, y, w, h, img, ann=None):
        if iou_type == "bbox":
            d["bbox"] = [x, y, w, h]
        elif iou_type == "segm":  # a box, or the instance's polygons moved with its box
            polygons = [[x, y, x + w, y, x + w, y + h, x, y + h]] if ann is None else [
                (np.array(p).reshape(-1, 2) + [x - ann["bbox"][0], y - ann["bbox"][1]]).ravel()
                .tolist() for p in ann["segmentation"]]
            rle = mask_util.merge(mask_util.frPyObjects(polygons, img["height"], img["width"]))
            d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        else:
            if ann is None:
                kp = np.c_[rng.uniform(x, x + w, 17), rng.uniform(y, y + h, 17), np.ones(17)]
            else:
                kp = np.array(ann["keypoints"], float).reshape(-1, 3)
                kp[:, :2] += rng.normal(0, 0.1 * np.sqrt(ann["area"]) ** 0.5, (len(kp), 2))
                kp[:, 2] = 1
            d["keypoints"] = kp.ravel().tolist()
        return d

    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd") or (iou_type == "keypoints" and not ann.get("num_keypoints")):
            continue
        img = coco.imgs[ann["image_id"]]
        for _ in range(2):
            x, y, w, h = ann["bbox"]
            j = rng.normal(0, 0.1, 4) * [w, h, w, h]
            cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
            d = {"image_id": ann["image_id"], "category_id": cat, "score": float(rng.random())}
            out.append(geometry(d, x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3]),
                                img, ann))
    for k, img_id in enumerate(sorted(coco.getImgIds())):
        img = coco.imgs[img_id]
        negatives = img.get("neg_category_ids") or cats
        for _ in range(false_positives + (more_on_first_image if k == 0 else 0)):
            w, h = rng.uniform(4, 0.5 * min(img["width"], img["height"]), 2)
            x, y = rng.uniform(0, img["width"] - w - 1), rng.uniform(0, img["height"] - h - 1)
            cat = int(rng.choice(negatives if rng.random() < 0.5 else cats))
            d = {"image_id": img_id, "category_id": cat, "score": float(rng.random() * 0.6)}
            out.append(geometry(d, x, y, w, h, img))
    return out


def _run(cls, gt, results, iou_type):
    dt = _quiet(gt.loadRes, copy.deepcopy(results))
    ev = cls(gt, dt, iou_type)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return ev


@requires_shared
@pytest.mark.parametrize("iou_type, ann_file", [
    ("bbox", "instances_val2017.json"),
    ("segm", "instances_val2017.json"),
    ("keypoints", "person_keypoints_val2017.json"),
])
def test_fast_coco_eval_equals_pycocotools(iou_type, ann_file):
    gt = _quiet(COCO, os.path.join(COCO_ANN, ann_file))
    results = make_detections(gt, iou_type)
    reference = _run(COCOeval, gt, results, iou_type)
    fast = _run(FasterCOCOeval, gt, results, iou_type)
    assert len(fast.stats) == len(reference.stats) == (10 if iou_type == "keypoints" else 12)
    # a real evaluation, not a degenerate one: AP well inside (0, 1)
    assert 0.2 < reference.stats[0] < 0.9
    np.testing.assert_allclose(fast.stats, reference.stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast.eval["precision"], reference.eval["precision"],
                               rtol=0, atol=1e-12)


@requires_shared
def test_coco_evaluator_of_the_harness_uses_the_fast_path(tmp_path, caplog):
    """The evaluator `coco` datasets get evaluates through the fast path, with pycocotools'
    numbers: predictions fed through process()/evaluate() as a model's would be."""
    from transfer.trainer import Trainer

    name = "coco_2017_val"
    evaluator = Trainer.build_evaluator(get_cfg(), name, str(tmp_path))._evaluators[0]
    assert isinstance(evaluator, COCOEvaluator) and evaluator._use_fast_impl
    if has_compiled_ops():  # detectron2's own compiled COCOeval_opt, unchanged
        assert coco_evaluation.COCOeval_opt.__module__ == "detectron2.evaluation.fast_eval_api"
    else:
        assert coco_evaluation.COCOeval_opt is FasterCOCOeval

    gt = _quiet(COCO, os.path.join(COCO_ANN, "instances_val2017.json"))
    results = make_detections(gt, "bbox", seed=1)
    contiguous = {c: i for i, c in enumerate(sorted(gt.getCatIds()))}
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        mine = [r for r in results if r["image_id"] == record["image_id"]]
        boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY, as a model predicts them
        inst = Instances((record["height"], record["width"]), pred_boxes=Boxes(boxes),
                         scores=torch.tensor([r["score"] for r in mine]),
                         pred_classes=torch.tensor([contiguous[r["category_id"]] for r in mine],
                                                   dtype=torch.int64))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    # the handler on the logger itself: a training run in this process (detectron2's
    # setup_logger for "transfer") stops propagation to the root logger caplog listens on
    log = logging.getLogger("transfer.fast_eval")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="transfer.fast_eval"):
            metrics = evaluator.evaluate()["bbox"]
    finally:
        log.removeHandler(caplog.handler)
    if not has_compiled_ops():
        assert any("COCOeval_opt.evaluate() finished" in r.getMessage() for r in caplog.records)
    # the detections detectron2 wrote for this evaluation, through pycocotools
    with open(tmp_path / "coco_instances_results.json") as f:
        written = json.load(f)
    assert len(written) == len(results)
    reference = _run(COCOeval, gt, written, "bbox")
    assert 0.2 < reference.stats[0] < 0.9
    for i, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        assert metrics[key] == pytest.approx(reference.stats[i] * 100, abs=1e-9)


def _lvis_api(lvis_gt, results, iou_type, max_dets=300):
    """lvis-api's own evaluation, as detectron2 v0.6 runs it (masks scored without boxes)."""
    results = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")}
               for r in copy.deepcopy(results)]
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=max_dets), iou_type)
    _quiet(ev.run)
    return {m: v * 100 for m, v in ev.get_results().items() if m in LVIS_METRICS}


@requires_shared
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_fast_lvis_eval_equals_lvis_api(iou_type):
    """lvis_tiny's 100-image val json (1230 classes, rare/common/frequent, negative and
    not-exhaustive classes per image); 330 detections on the first image test the cap of 300."""
    path = os.path.join(LVIS_ANN, "lvis_v0.5_val_100.json")
    lvis_gt = _quiet(LVIS, path)
    results = make_detections(_quiet(COCO, path), iou_type, seed=2, more_on_first_image=330)
    first = min(r["image_id"] for r in results)
    assert sum(r["image_id"] == first for r in results) > 300
    reference = _lvis_api(lvis_gt, results, iou_type)
    fast = evaluate_lvis(lvis_gt, copy.deepcopy(results), iou_type)
    assert set(fast) == set(reference) == set(LVIS_METRICS)
    assert all(0 < reference[m] < 100 for m in ("AP", "APc", "APf")), reference
    for m in LVIS_METRICS:
        assert fast[m] == pytest.approx(reference[m], abs=1e-9), m


@requires_shared
def test_lvis_evaluator_of_the_harness_uses_the_fast_path(tmp_path):
    """`lvis` datasets get FasterLVISEvaluator; fed like a model's outputs, it gives lvis-api's
    numbers on the detections it wrote."""
    from transfer.trainer import Trainer

    name = "lvis_v0.5_val"  # the conftest root: lvis_tiny's json of its one present image
    evaluator = Trainer.build_evaluator(get_cfg(), name, str(tmp_path))._evaluators[0]
    assert isinstance(evaluator, FasterLVISEvaluator)
    lvis_gt = evaluator._lvis_api
    results = make_detections(_quiet(COCO, LVIS_PRESENT), "bbox", seed=3)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        mine = [r for r in results if r["image_id"] == record["image_id"]]
        boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        inst = Instances((record["height"], record["width"]), pred_boxes=Boxes(boxes),
                         scores=torch.tensor([r["score"] for r in mine]),
                         pred_classes=torch.tensor([r["category_id"] - 1 for r in mine],
                                                   dtype=torch.int64))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    metrics = evaluator.evaluate()["bbox"]
    with open(tmp_path / "lvis_instances_results.json") as f:
        written = json.load(f)
    assert len(written) == len(results)
    reference = _lvis_api(lvis_gt, written, "bbox")
    assert 0 < reference["AP"] < 100
    for m in LVIS_METRICS:
        assert metrics[m] == pytest.approx(reference[m], abs=1e-9), m
