"""The fast COCO evaluator keeps the contract of detectron2's compiled ``COCOeval_opt``.

detectron2 v0.6 states it in ``tests/data/test_coco_evaluation.py::TestCOCOeval::test_fast_eval``:
on every experiment, the precision and recall arrays equal pycocotools' ``COCOeval``, or both
raise the same exception type. Its experiments are written here again, for this project's
stand-in (``transfer.fast_eval.FasterCOCOeval``), on the same kind of data: one image (COCO val
image 139's id and size) with two people, the categories person and bed, three person
detections. The outlines are octagons inside the boxes and the keypoints are generated, so the
numbers are this test's own. Two versions of the data: as detectron2's (no keypoints anywhere,
so keypoint evaluation mostly fails, and must fail the same way) and with keypoints (so keypoint
evaluation gives arrays to compare).
"""
import contextlib
import copy
import io
import logging

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from transfer.fast_eval import FasterCOCOeval

HEIGHT, WIDTH = 426, 640
PEOPLE = [[412.8, 157.61, 53.05, 138.01], [384.43, 172.21, 15.12, 35.74]]
DETECTIONS = [([417.33, 159.27, 47.66, 143.0], 0.995), ([383.59, 172.08, 17.96, 36.95], 0.769),
              ([457.84, 158.88, 9.9, 8.77], 0.076)]  # (box, score): both people, one stray
FIELDS = ["id", "image_id", "category_id", "score", "area", "iscrowd", "ignore", "bbox",
          "segmentation", "keypoints", "num_keypoints"]
IOU_TYPES = ["bbox", "segm", "keypoints"]


def octagon(x, y, w, h):
    a, b = 0.3 * w, 0.3 * h
    return [x + a, y, x + w - a, y, x + w, y + b, x + w, y + h - b,
            x + w - a, y + h, x + a, y + h, x, y + h - b, x, y + b]


def rle(polygon):
    return mask_util.merge(mask_util.frPyObjects([polygon], HEIGHT, WIDTH))


def keypoints(box, visible, rng):
    """17 (x, y, v) inside the box, top to bottom; invisible ones at (0, 0, 0) as COCO writes."""
    x, y, w, h = box
    points = np.c_[x + w * rng.uniform(0.2, 0.8, 17), y + h * np.linspace(0.05, 0.95, 17),
                   np.full(17, 2)]
    points[~visible] = 0
    return points.ravel().tolist()


def person(i, box, rng, with_keypoints):
    polygon = octagon(*box)
    ann = {"id": i, "image_id": 139, "category_id": 1, "bbox": box, "segmentation": [polygon],
           "area": float(mask_util.area(rle(polygon))), "iscrowd": 0}
    if with_keypoints:
        visible = rng.random(17) < 0.6
        ann.update(keypoints=keypoints(box, visible, rng), num_keypoints=int(visible.sum()))
    return ann


def detection(box, score, rng, with_keypoints):
    mask = rle(octagon(*box))
    d = {"image_id": 139, "category_id": 1, "bbox": box, "score": score,
         "segmentation": {"size": mask["size"], "counts": mask["counts"].decode()}}
    if with_keypoints:
        d["keypoints"] = keypoints(box, np.ones(17, bool), rng)
    return d


def image_139(with_keypoints):
    """(ground truth json, detections in COCO results format)."""
    rng = np.random.default_rng(139)
    gt = {"images": [{"id": 139, "height": HEIGHT, "width": WIDTH,
                      "file_name": "000000000139.jpg"}],
          "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                         {"id": 65, "name": "bed", "supercategory": "furniture"}],
          "annotations": [person(i + 1, box, rng, with_keypoints)
                          for i, box in enumerate(PEOPLE)]}
    return gt, [detection(box, score, rng, with_keypoints) for box, score in DETECTIONS]


def omitted(anns, field):
    anns = copy.deepcopy(anns)
    for a in anns:
        a.pop(field, None)
    return anns


def experiments(gt, dets):
    """name -> (detections, ground truth, params): detectron2's, with keypoints' fields among
    the omitted ones, and three of two changes at once (which error comes first). Ground truth
    without ``image_id`` or ``category_id`` is refused by pycocotools' COCO itself (KeyError),
    before either evaluator sees it."""
    no_anns = dict(gt, annotations=[])
    out = {"full": (dets, gt, {}), "empty_dt": ([], gt, {}), "empty_gt": (dets, no_anns, {}),
           "no_categories": (dets, gt, {"useCats": 0}),
           "no_ious": (dets, gt, {"iouThrs": []}), "no_rec_thrs": (dets, gt, {"recThrs": []}),
           "no_max_dets": (dets, gt, {"maxDets": []}),
           "one_max_det": (dets, gt, {"maxDets": [1]}),
           "no_area": (dets, gt, {"areaRng": [], "areaRngLbl": []})}
    for field in FIELDS:
        out["omit_gt_" + field] = (dets, dict(gt, annotations=omitted(gt["annotations"], field)),
                                   {})
        out["omit_dt_" + field] = (omitted(dets, field), gt, {})
    out["no_max_dets_omit_gt_iscrowd"] = (dets, out["omit_gt_iscrowd"][1], {"maxDets": []})
    out["no_max_dets_omit_dt_score"] = (out["omit_dt_score"][0], gt, {"maxDets": []})
    out["no_area_omit_gt_area"] = (dets, out["omit_gt_area"][1], out["no_area"][2])
    return out


def empty_results(gt):
    """Detections of a model that found nothing (pycocotools' loadRes refuses an empty list)."""
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                  "annotations": []}
    dt.createIndex()
    return dt


def datasets(gt_json, results):
    """The ground truth indexed by pycocotools' COCO and the results loaded by its loadRes, as
    detectron2's COCOEvaluator hands them to the evaluator (copies: both are annotated)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_json)
        gt.createIndex()
        return gt, (gt.loadRes(copy.deepcopy(results)) if results else empty_results(gt))


def outcome(cls, gt_json, results, iou_type, params):
    """(precision, recall) of evaluator `cls`, or the type of what it raised."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ev = cls(*datasets(gt_json, results), iou_type)
            for name, value in params.items():
                setattr(ev.params, name, copy.deepcopy(value))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    except Exception as e:  # noqa: BLE001 (the exception type is the outcome)
        return type(e)
    return ev.eval["precision"], ev.eval["recall"]


def describe(result):
    return result.__name__ if isinstance(result, type) else f"precision {result[0].shape}"


def agree(reference, fast):
    if isinstance(reference, type) or isinstance(fast, type):
        return reference is fast
    return all(r.shape == f.shape and np.allclose(r, f, rtol=0, atol=1e-12)
               for r, f in zip(reference, fast))


@pytest.mark.parametrize("with_keypoints", [False, True], ids=["as_detectron2", "keypoints"])
@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_fast_eval_equals_pycocotools_on_detectron2_experiments(iou_type, with_keypoints):
    gt, dets = image_139(with_keypoints)
    table = {name: (outcome(COCOeval, g, d, iou_type, params),
                    outcome(FasterCOCOeval, g, d, iou_type, params))
             for name, (d, g, params) in experiments(gt, dets).items()}
    full = table["full"][0]
    if iou_type != "keypoints" or with_keypoints:  # a real evaluation, not a degenerate one
        assert not isinstance(full, type) and 0 < full[0][full[0] > -1].mean() < 1
    wrong = [f"{name}: pycocotools {describe(ref)}, stand-in {describe(fast)}"
             for name, (ref, fast) in table.items() if not agree(ref, fast)]
    assert not wrong, "\n".join(wrong)


def test_keypoints_without_categories_run_on_pycocotools_logged_once(caplog):
    """faster-coco-eval fails on keypoints with useCats=0; pycocotools evaluates them (that
    evaluation is in the experiments above); the stand-in says once that it hands over."""
    gt, dets = image_139(with_keypoints=True)
    log = logging.getLogger("transfer.fast_eval")
    log.addHandler(caplog.handler)  # the logger may not propagate (detectron2's setup_logger)
    try:
        with caplog.at_level("WARNING", logger="transfer.fast_eval"):
            reference = outcome(COCOeval, gt, dets, "keypoints", {"useCats": 0})
            ev = FasterCOCOeval(*datasets(gt, dets), "keypoints")
            ev.params.useCats = 0
            for _ in range(2):
                ev.evaluate()
                ev.accumulate()
    finally:
        log.removeHandler(caplog.handler)
    # by record: the handler may hear it twice, from the logger and through the root logger
    said = {id(r): r for r in caplog.records if "pycocotools" in r.getMessage()}
    assert [r.levelname for r in said.values()] == ["WARNING"]
    assert agree(reference, (ev.eval["precision"], ev.eval["recall"]))


@pytest.mark.parametrize("field", ["area", "iscrowd"])
def test_ground_truth_without_a_field_is_refused_naming_it(field):
    """pycocotools refuses it (KeyError); so does the stand-in, saying which annotation."""
    gt, dets = image_139(with_keypoints=False)
    gt["annotations"] = omitted(gt["annotations"], field)
    ev = FasterCOCOeval(*datasets(gt, dets), "bbox")
    with pytest.raises(KeyError, match=f"annotation 1 of image 139 has no '{field}'"):
        ev.evaluate()
