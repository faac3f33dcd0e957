"""Fast COCO evaluation without detectron2's compiled extension.

detectron2's ``COCOEvaluator(use_fast_impl=True)`` evaluates with ``COCOeval_opt``, whose per-image
matching and accumulation run in ``detectron2._C``. Without a compiled detectron2 (this project's
pure-Python install, see ``d2.py``), ``COCOeval_opt`` is this module's ``FasterCOCOeval``:
faster-coco-eval's C++-backed ``COCOeval`` (PyPI, pinned in requirements.txt), several times
faster than pycocotools (``make bench``, section ``coco_eval``).

It keeps the compiled evaluator's contract (detectron2 v0.6's ``TestCOCOeval.test_fast_eval``):
the precision and recall arrays equal pycocotools', or both raise the same exception type.
faster-coco-eval, called as it is, departs from pycocotools in a few places, each handled here:
- keypoints: it scores only the categories that have annotations; here all of the ground truth's
  categories, as pycocotools (the precision array's K axis is detectron2's class list);
- ground truth without ``iscrowd``, ``area`` (or, for keypoints, ``num_keypoints``): it scores
  with defaults where pycocotools raises KeyError; here checked first, in pycocotools' order
  (``check_as_pycocotools``);
- keypoints with ``useCats = 0``: it fails where pycocotools evaluates; that evaluation runs on
  pycocotools' ``COCOeval`` itself, logged;
- ``summarize()`` is pycocotools' own (its ``stats`` and its errors: fewer than 3 ``maxDets``,
  renamed area ranges), its lines logged.
Every experiment: tests/test_fast_eval_contract.py; numbers on real data: tests/test_fast_eval.py.

faster-coco-eval's C++ entry points take its own dataset objects, not the per-instance lists
detectron2's ``COCOeval_opt`` passes to ``_C``, so the whole evaluator class is used instead.
LVIS: ``evaluate_lvis`` scores with faster-coco-eval in LVIS mode, which gives lvis-api's
``LVISEval`` numbers (tests/test_fast_eval.py); ``evaluators.FasterLVISEvaluator`` calls it.

No ``detectron2.evaluation`` import here: ``d2.py`` loads this module while detectron2's
evaluation package is still being imported.
"""
import contextlib
import copy
import io
import logging

from detectron2.utils.logger import create_small_table
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from lvis import LVISResults
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

# the parameters a COCOeval user sets (detectron2: imgIds, maxDets, kpt_oks_sigmas)
PARAMS = ("imgIds", "catIds", "iouThrs", "recThrs", "maxDets", "areaRng", "areaRngLbl", "useCats")


def as_faster_coco(coco):
    """The same dataset (the same annotation dicts, not copies) indexed by faster-coco-eval's COCO
    class, which its evaluator reads (e.g. ``cat_img_map``); detectron2 hands pycocotools' COCO."""
    if coco is None or isinstance(coco, FasterCOCO):
        return coco
    fast = FasterCOCO()
    fast.dataset = coco.dataset
    fast.createIndex()
    return fast


@contextlib.contextmanager
def printed_to_log():
    """pycocotools prints its progress and summary; they go to this module's log instead."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        if out.getvalue():
            logger.info(out.getvalue().rstrip())


def _require(anns, field, why):
    missing = next((a for a in anns if field not in a), None)
    if missing is not None:
        raise KeyError(f"annotation {missing.get('id')} of image {missing.get('image_id')} has "
                       f"no {field!r}, which COCO evaluation needs {why}; add it to the json")


def _ignored(gt, iou_type):
    """pycocotools' ignore flag: crowd regions, and for keypoints people without keypoints."""
    crowd = bool(gt.get("iscrowd"))
    return crowd or (iou_type == "keypoints" and gt["num_keypoints"] == 0)


def _loaded(coco, p):
    """The annotations pycocotools' ``_prepare`` loads: those of ``params.imgIds`` (all when
    empty) and, with ``useCats``, of ``params.catIds`` (all when empty)."""
    anns = ([a for i in p.imgIds for a in coco.imgToAnns.get(i, ())] if p.imgIds
            else coco.dataset.get("annotations", []))
    if p.useCats and p.catIds:
        cats = set(p.catIds)
        anns = [a for a in anns if a["category_id"] in cats]
    return anns


def check_as_pycocotools(coco_gt, coco_dt, p):
    """Raise what pycocotools' ``COCOeval.evaluate()`` raises on input that faster-coco-eval
    would score with defaults, in pycocotools' order (its ``_prepare``, then ``computeIoU`` /
    ``computeOks``, then ``evaluateImg``), so that the first error is of the same type."""
    gts, dts = _loaded(coco_gt, p), _loaded(coco_dt, p)
    if p.iouType == "segm":
        _require(gts + dts, "segmentation", "for mask IoU")
    if p.iouType == "keypoints":
        _require(gts, "num_keypoints", "for keypoint evaluation")
    if not (p.useCats and p.catIds):  # scored: those of params.catIds (merged without useCats)
        cats = set(p.catIds)
        gts, dts = ([a for a in anns if a["category_id"] in cats] for anns in (gts, dts))
    _require(dts, "score", "to rank the detections")
    if not p.maxDets:
        raise IndexError("params.maxDets is empty: COCO evaluation needs at least one limit of "
                         "detections per image")
    if p.iouType != "keypoints":
        _require(gts, "iscrowd", "to match crowd regions")
    if p.areaRng:
        _require([g for g in gts if not _ignored(g, p.iouType)], "area",
                 "to place it in the area ranges")
        _require(gts, "iscrowd", "to match crowd regions")


def copy_params(source, target):
    names = PARAMS + (("kpt_oks_sigmas",) if source.iouType == "keypoints" else ())
    for name in names:
        setattr(target, name, copy.deepcopy(getattr(source, name)))


def pycocotools_twin(coco_gt, coco_dt, params):
    """pycocotools' COCOeval on the same datasets with the same parameters."""
    twin = COCOeval(coco_gt, coco_dt, params.iouType)
    copy_params(params, twin.params)
    return twin


def needs_pycocotools(params):
    """Settings faster-coco-eval cannot evaluate as pycocotools does."""
    # keypoints without categories: pycocotools pairs detections with no ground truth (its
    # computeOks ignores useCats); faster-coco-eval raises RuntimeError
    return params.iouType == "keypoints" and not params.useCats


class FasterCOCOeval(COCOeval_faster):
    """pycocotools' ``COCOeval(cocoGt, cocoDt, iouType)`` interface on faster-coco-eval's C++
    implementation: ``params``, ``evaluate()``, ``accumulate()``, ``summarize()``, ``stats``
    and ``eval["precision"]``/``["recall"]`` as pycocotools computes them (the module docstring
    lists how), which detectron2's ``COCOEvaluator`` reads."""

    def __init__(self, cocoGt=None, cocoDt=None, iouType="segm"):
        super().__init__(as_faster_coco(cocoGt), as_faster_coco(cocoDt), iouType,
                         print_function=logger.info)
        self._given = (cocoGt, cocoDt)  # pycocotools' own, for an evaluation it must run
        self._twin = None
        self._fallback_logged = False
        if cocoGt is not None:  # all categories, as pycocotools (keypoints: not only annotated)
            self.params.catIds = sorted(cocoGt.getCatIds())

    def evaluate(self):
        self._twin = None
        if needs_pycocotools(self.params):
            self._run_on_pycocotools()
            return
        check_as_pycocotools(self.cocoGt, self.cocoDt, self.params)
        super().evaluate()

    def _run_on_pycocotools(self):
        if not self._fallback_logged:
            logger.warning("%s evaluation with useCats=0 runs on pycocotools' COCOeval "
                           "(faster-coco-eval cannot give its numbers there): slower, same "
                           "numbers", self.params.iouType)
            self._fallback_logged = True
        self._twin = pycocotools_twin(*self._given, self.params)
        with printed_to_log():
            self._twin.evaluate()
        copy_params(self._twin.params, self.params)  # as its evaluate() left them (sorted, ...)

    def accumulate(self):
        if self._twin is None:
            super().accumulate()
            return
        with printed_to_log():
            self._twin.accumulate()
        self.eval = self._twin.eval

    def summarize(self):
        """pycocotools' summary of these arrays: its 12 (keypoints 10) numbers in ``stats``."""
        with printed_to_log():
            COCOeval.summarize(self)


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
