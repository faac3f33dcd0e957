"""Fast COCO evaluation without detectron2's compiled extension.

detectron2's ``COCOEvaluator(use_fast_impl=True)`` evaluates with ``COCOeval_opt``, whose per-image
matching and accumulation run in ``detectron2._C``. Without a compiled detectron2 (this project's
pure-Python install, see ``d2.py``), ``COCOeval_opt`` is this module's ``FasterCOCOeval``:
faster-coco-eval's C++-backed ``COCOeval`` (PyPI, pinned in requirements.txt), which gives
pycocotools' numbers (checked metric by metric in tests/test_fast_eval.py) several times faster
(``make bench``, section ``coco_eval``).

faster-coco-eval's C++ entry points take its own dataset objects, not the per-instance lists
detectron2's ``COCOeval_opt`` passes to ``_C``, so the whole evaluator class is used instead.
LVIS stays on lvis-api's ``LVISEval`` (see ``tests/test_fast_eval.py`` for why).
"""
import logging

from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster

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
