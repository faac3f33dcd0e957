"""Fast COCO evaluation without detectron2's compiled extension.

detectron2's ``COCOEvaluator(use_fast_impl=True)`` evaluates with ``COCOeval_opt``, whose per-image
matching and accumulation run in ``detectron2._C``. Without a compiled detectron2 (this project's
pure-Python install, see ``d2.py``), ``COCOeval_opt`` is this module's ``FasterCOCOeval``:
faster-coco-eval's C++-backed ``COCOeval`` (PyPI, pinned in requirements.txt), which gives
pycocotools' numbers (checked metric by metric in tests/test_fast_eval.py) several times faster
(``make bench``, section ``coco_eval``).

faster-coco-eval's C++ entry points take its own dataset objects, not the per-instance lists
detectron2's ``COCOeval_opt`` passes to ``_C``, so the whole evaluator class is used instead.
LVIS: ``evaluate_lvis`` scores with faster-coco-eval in LVIS mode, which gives lvis-api's
``LVISEval`` numbers (tests/test_fast_eval.py); ``evaluators.FasterLVISEvaluator`` calls it.

No ``detectron2.evaluation`` import here: ``d2.py`` loads this module while detectron2's
evaluation package is still being imported.
"""
import logging

from detectron2.utils.logger import create_small_table
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from lvis import LVISResults

logger = logging.getLogger(__name__)


def as_faster_coco(coco):
    """The same dataset (the same annotation dicts, not copies) indexed by faster-coco-eval's COCO
    class, which its evaluator reads (e.g. ``cat_img_map``); detectron2 hands pycocotools' COCO."""
    if coco is None or isinstance(coco, FasterCOCO):
        return coco
    fast = FasterCOCO()
    fast.dataset = coco.dataset
    fast.createIndex()
    return fast


class FasterCOCOeval(COCOeval_faster):
    """pycocotools' ``COCOeval(cocoGt, cocoDt, iouType)`` interface on faster-coco-eval's C++
    implementation: ``params``, ``evaluate()``, ``accumulate()``, ``summarize()``, ``stats``
    (pycocotools' 12 detection / 10 keypoint summary numbers, in its order) and
    ``eval["precision"]`` as detectron2's ``COCOEvaluator`` reads them."""

    def __init__(self, cocoGt=None, cocoDt=None, iouType="segm"):
        super().__init__(as_faster_coco(cocoGt), as_faster_coco(cocoDt), iouType,
                         print_function=logger.info)


# ------------------------------------------------------------------------------------- LVIS
# LVIS's summary numbers (detectron2's names) -> faster-coco-eval's LVIS-mode names
LVIS_METRICS = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small",
                "APm": "AP_medium", "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf"}
LVIS_MAX_DETS = 300  # per image, the LVIS protocol's limit


def evaluate_lvis(lvis_gt, lvis_results, iou_type, max_dets_per_image=None):
    """LVIS AP (percent, detectron2's metric names) of results in LVIS json format: lvis-api's
    ``LVISResults`` keeps the top ``max_dets_per_image`` per image as lvis-api does, then
    faster-coco-eval's ``COCOeval`` in LVIS mode (negative / not-exhaustive categories, rare /
    common / frequent AP) evaluates; equal to lvis-api's ``LVISEval`` (tests/test_fast_eval.py).
    """
    if not lvis_results:
        logger.warning("No predictions to evaluate for %s", iou_type)
        return {m: float("nan") for m in LVIS_METRICS}
    max_dets = LVIS_MAX_DETS if max_dets_per_image is None else max_dets_per_image
    # copies: LVISResults and the evaluator annotate the dicts; masks are scored with their own
    # area, so a segm result carries no box (detectron2 drops it for the same reason)
    results = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")}
               for r in lvis_results]
    lvis_dt = LVISResults(lvis_gt, results, max_dets=max_dets)
    # LVIS scores a class on an image only where it is verified present (has an annotation
    # there) or absent (neg_category_ids); the rest are left out before faster-coco-eval sees
    # them, as lvis-api leaves them out (its own filter fails on masks of an image left with
    # no detection and no annotation)
    verified = {(a["image_id"], a["category_id"]) for a in lvis_gt.dataset["annotations"]}
    verified |= {(img["id"], c) for img in lvis_gt.dataset["images"]
                 for c in img.get("neg_category_ids", [])}
    lvis_dt.dataset["annotations"] = [d for d in lvis_dt.dataset["annotations"]
                                      if (d["image_id"], d["category_id"]) in verified]
    ev = COCOeval_faster(as_faster_coco(lvis_gt), as_faster_coco(lvis_dt), iou_type,
                         lvis_style=True, print_function=logger.info)
    ev.params.maxDets = [max_dets]
    ev.run()
    stats = ev.stats_as_dict
    metrics = {m: float(stats[k] * 100) for m, k in LVIS_METRICS.items()}
    logger.info("Evaluation results for %s:\n%s", iou_type, create_small_table(metrics))
    return metrics
