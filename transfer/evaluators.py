"""The evaluator of each dataset, chosen by its ``evaluator_type`` (detectron2's metadata).

A model family with its own metric registers it from its own package (DensePose:
``densepose/evaluation.py``) with ``@register_evaluator("<evaluator_type>")``.
"""
import json
import os
import time

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator, CityscapesSemSegEvaluator, COCOEvaluator, DatasetEvaluators,
    LVISEvaluator, PascalVOCDetectionEvaluator, SemSegEvaluator)

from convert.files import write_text_atomic
from transfer.fast_eval import evaluate_lvis

EVALUATORS = {}


def register_evaluator(evaluator_type):
    """Register ``builder(dataset_name, cfg, output_dir) -> DatasetEvaluator``."""
    def deco(builder):
        EVALUATORS[evaluator_type] = builder
        return builder
    return deco


def build_evaluator(cfg, dataset_name, output_folder=None):
    out = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    et = MetadataCatalog.get(dataset_name).get("evaluator_type", "")
    if et not in EVALUATORS:
        raise KeyError(f"no evaluator for dataset '{dataset_name}' of evaluator type "
                       f"'{et}'; known types: {', '.join(sorted(EVALUATORS))}")
    return DatasetEvaluators([EVALUATORS[et](dataset_name, cfg, out)])


class FasterLVISEvaluator(LVISEvaluator):
    """detectron2's ``LVISEvaluator`` (same inputs, outputs, results file) whose predictions
    are scored by ``fast_eval.evaluate_lvis`` instead of lvis-api's pure-Python ``LVISEval``
    (detectron2 v0.6 calls ``LVISEval`` from inside a module function, so the evaluator's
    ``_eval_predictions`` is where it is replaced)."""

    def _eval_predictions(self, predictions):
        results = [r for p in predictions for r in p["instances"]]
        tasks = self._tasks or self._tasks_from_predictions(results)
        # the model's contiguous class ids back to the json's category ids
        to_json = {v: k for k, v in
                   self._metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
        for r in results:
            r["category_id"] = to_json[r["category_id"]] if to_json else r["category_id"] + 1
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            os.makedirs(self._output_dir, exist_ok=True)
            write_text_atomic(json.dumps(results), path)
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        for task in sorted(tasks):
            self._results[task] = evaluate_lvis(self._lvis_api, results, task,
                                                self._max_dets_per_image)


class CityscapesInstanceEvaluatorKeepingMatches(CityscapesInstanceEvaluator):
    """cityscapesscripts writes its per-image matches to ./matches.json, in whatever directory
    the run was started from; move that file into the run's output folder."""

    def __init__(self, dataset_name, output_dir):
        super().__init__(dataset_name)
        self._output_dir = output_dir

    def evaluate(self):
        started = time.time()
        results = super().evaluate()
        if comm.is_main_process() and os.path.isfile("matches.json") and \
                os.path.getmtime("matches.json") >= started - 1:
            os.makedirs(self._output_dir, exist_ok=True)
            os.replace("matches.json",
                       os.path.join(self._output_dir, "cityscapes_instance_matches.json"))
        return results


@register_evaluator("coco")
def _coco(name, cfg, out):
    # fast path: detectron2's compiled COCOeval_opt, or without it faster-coco-eval's (d2.py)
    return COCOEvaluator(name, output_dir=out, use_fast_impl=True)


register_evaluator("lvis")(lambda name, cfg, out: FasterLVISEvaluator(name, output_dir=out))
register_evaluator("pascal_voc")(lambda name, cfg, out: PascalVOCDetectionEvaluator(name))
register_evaluator("cityscapes_instance")(
    lambda name, cfg, out: CityscapesInstanceEvaluatorKeepingMatches(name, out))
register_evaluator("cityscapes_sem_seg")(lambda name, cfg, out: CityscapesSemSegEvaluator(name))
register_evaluator("sem_seg")(
    lambda name, cfg, out: SemSegEvaluator(name, distributed=True, output_dir=out))
