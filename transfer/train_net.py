"""Fine-tune and evaluate one transfer task: ``make transfer TASK=... WEIGHTS=...``.

    python -m transfer.train_net --task voc_frcnn_c4_24k --weights moco.pkl --seed 0
    python -m transfer.train_net --task coco_mask_fpn_2x --weights supervised --num-gpus 8
    python -m transfer.train_net --task voc_frcnn_c4_24k --weights random --dry-run
    ... [KEY VALUE ...]   detectron2 config overrides, applied last

Each run writes <runs>/<task>/<weights>/seed<k>/: config.yaml (resolved), metrics.json,
results.json (final evaluation), status.json, checkpoints. An interrupted run resumes from its
last checkpoint when started again with the same arguments.
"""
import argparse
import json
import logging
import os
import time
import traceback
import weakref

import torch

from transfer.d2 import ensure_detectron2

ensure_detectron2()

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.engine import DefaultTrainer, default_setup, hooks, launch  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.evaluation import (  # noqa: E402
    CityscapesInstanceEvaluator, CityscapesSemSegEvaluator, COCOEvaluator, DatasetEvaluators,
    PascalVOCDetectionEvaluator, SemSegEvaluator)
from detectron2.data import DatasetMapper, MetadataCatalog  # noqa: E402
from fvcore.nn.precise_bn import get_bn_modules  # noqa: E402

from pretrain.engine import write_text_atomic  # noqa: E402
from transfer import datasets, sampling  # noqa: E402
from transfer import console, speed  # noqa: E402
from transfer.checkpoint import AtomicCheckpointer  # noqa: E402
from transfer.config import setup_cfg  # noqa: E402
from transfer.fast_eval import FasterLVISEvaluator  # noqa: E402
from transfer.errors import UserError  # noqa: E402
from transfer.weights import load_pretrained  # noqa: E402

logger = logging.getLogger("transfer")


# ---------------------------------------------------------------- evaluators, by evaluator type
def _coco(name, cfg, out):
    # fast path: detectron2's compiled COCOeval_opt, or without it faster-coco-eval's (d2.py)
    return COCOEvaluator(name, output_dir=out, use_fast_impl=True)


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


EVALUATORS = {
    "coco": _coco,
    "lvis": lambda name, cfg, out: FasterLVISEvaluator(name, output_dir=out),
    "pascal_voc": lambda name, cfg, out: PascalVOCDetectionEvaluator(name),
    "cityscapes_instance": lambda name, cfg, out: CityscapesInstanceEvaluatorKeepingMatches(
        name, out),
    "cityscapes_sem_seg": lambda name, cfg, out: CityscapesSemSegEvaluator(name),
    "sem_seg": lambda name, cfg, out: SemSegEvaluator(name, distributed=True, output_dir=out),
}


def register_evaluator(evaluator_type):
    def deco(fn):
        EVALUATORS[evaluator_type] = fn
        return fn
    return deco


@register_evaluator("densepose")
def _densepose(name, cfg, out):
    from transfer.densepose.config import densepose_data_dir
    from transfer.densepose.evaluation import DensePoseEvaluator

    return DensePoseEvaluator(name, output_dir=out,
                              data_dir=densepose_data_dir(cfg.DENSEPOSE.DATA))


class SyncedPreciseBN(hooks.PreciseBN):
    """PreciseBN whose recomputed statistics are averaged over all processes (detectron2's
    hook recomputes them per process, and only rank 0's are saved and evaluated), on batches
    fixed by the iteration it runs after (its own stream of the deterministic loader), so a
    resumed run recomputes the same statistics."""

    def update_stats(self):
        self._data_loader.start_iter = self.trainer.iter
        self._data_iter = iter(self._data_loader)
        super().update_stats()
        if comm.get_world_size() == 1:
            return
        for bn in get_bn_modules(self._model):
            for buf in (bn.running_mean, bn.running_var):
                torch.distributed.all_reduce(buf)
                buf /= comm.get_world_size()


class Trainer(DefaultTrainer):
    @classmethod
    def build_optimizer(cls, cfg, model):
        return speed.foreach_sgd(super().build_optimizer(cfg, model))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        out = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        et = MetadataCatalog.get(dataset_name).get("evaluator_type", "")
        if et not in EVALUATORS:
            raise KeyError(f"no evaluator for dataset '{dataset_name}' of evaluator type "
                           f"'{et}'; known types: {', '.join(EVALUATORS)}")
        return DatasetEvaluators([EVALUATORS[et](dataset_name, cfg, out)])

    @classmethod
    def train_mapper(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
            from transfer.semseg import SemSegCropMapper

            return SemSegCropMapper(cfg, True)
        if cfg.MODEL.DENSEPOSE_ON:
            from transfer.densepose.data import DensePoseDatasetMapper

            return DensePoseDatasetMapper(cfg, True)
        return DatasetMapper(cfg, True)

    @classmethod
    def build_train_loader(cls, cfg, stream=sampling.TRAIN, num_workers=None):
        """The task's mapper under a loader whose batches and augmentations are a function
        of (seed, iteration, sample) (transfer/sampling.py): resumable exactly."""
        return sampling.build_train_loader(cfg, cls.train_mapper(cfg), stream, num_workers)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":  # full-size inference
            from detectron2.data import build_detection_test_loader
            from transfer.semseg import SemSegCropMapper

            return build_detection_test_loader(cfg, dataset_name,
                                               mapper=SemSegCropMapper(cfg, False))
        return super().build_test_loader(cfg, dataset_name)

    def build_hooks(self):
        # DefaultTrainer builds its checkpointer just before the hooks; the periodic
        # checkpointer hook must get the atomic one
        self.checkpointer = AtomicCheckpointer(self.model, self.cfg.OUTPUT_DIR,
                                               trainer=weakref.proxy(self))
        hook_list = [sampling.SeedEachIteration(self.cfg.SEED)] + super().build_hooks()
        for i, h in enumerate(hook_list):
            if type(h) is hooks.PeriodicWriter and self.cfg.MOCO_TRANSFER.SCALE != "full":
                hook_list[i] = hooks.PeriodicWriter(self.build_writers(),
                                                    period=speed.writer_period(self.cfg))
            if type(h) is hooks.PreciseBN:  # same period/model, synced statistics
                hook_list[i] = SyncedPreciseBN(
                    self.cfg.TEST.EVAL_PERIOD, self.model,
                    self.build_train_loader(self.cfg, sampling.PRECISE_BN, num_workers=0),
                    self.cfg.TEST.PRECISE_BN.NUM_ITER)
        return hook_list + console.progress_hooks(self.cfg)

    def state_dict(self):
        """detectron2 v0.6 checkpoints the iteration and the scheduler only: add the optimizer
        (momentum buffers, current lr) and AMP's grad scaler, as later detectron2 does."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("this checkpoint has no optimizer state (written before it was "
                           "saved): the momentum restarts from zero")

    def resume_or_load(self, resume=True):
        """Resume from the newest readable checkpoint of the run (model, optimizer, scheduler,
        iteration; the data and random draws follow from the iteration), else load the
        pretrained weights and start at iteration 0."""
        path = self.checkpointer.readable_checkpoint() if resume else None
        if path:
            self.checkpointer.load(path)
            self.start_iter = self.iter + 1
        else:
            if self.cfg.MODEL.WEIGHTS:
                model = self.model.module if hasattr(self.model, "module") else self.model
                load_pretrained(model, self.cfg.MODEL.WEIGHTS)
            self.start_iter = 0
        self._trainer.data_loader.start_iter = self.start_iter
        if comm.is_main_process():
            trim_metrics(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)


def trim_metrics(path, start_iter):
    """Drop the records of iterations a resumed run trains again (and a line cut by a kill).

    Rewritten in place: detectron2's JSONWriter already holds the file open for appending."""
    if not os.path.isfile(path):
        return
    with open(path, "r+") as f:
        lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("iteration", -1) < start_iter:
                    kept.append(line)
            except ValueError:
                continue
        if kept != lines:
            f.seek(0)
            f.write("".join(k + "\n" for k in kept))
            f.truncate()


# ---------------------------------------------------------------- run bookkeeping
def protocol_of(cfg):
    """The settings that must agree for runs to be averaged together."""
    return {
        "max_iter": cfg.SOLVER.MAX_ITER, "steps": list(cfg.SOLVER.STEPS),
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "base_lr": cfg.SOLVER.BASE_LR,
        "warmup_iters": cfg.SOLVER.WARMUP_ITERS, "norm": cfg.MODEL.RESNETS.NORM,
        "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN), "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "num_gpus": cfg.MOCO_TRANSFER.NUM_GPUS, "scale": cfg.MOCO_TRANSFER.SCALE,
        "reference_world_size": cfg.SOLVER.REFERENCE_WORLD_SIZE,
    }


def write_json_atomic(obj, path):
    write_text_atomic(json.dumps(obj, indent=1, default=str), path)


def run_record(cfg, **extra):
    return {"task": cfg.MOCO_TRANSFER.TASK, "weights": cfg.MOCO_TRANSFER.WEIGHTS,
            "weights_file": cfg.MODEL.WEIGHTS, "weights_sha256": cfg.MOCO_TRANSFER.WEIGHTS_SHA256,
            "seed": cfg.SEED, "scale": cfg.MOCO_TRANSFER.SCALE, "protocol": protocol_of(cfg),
            "metrics_wanted": list(cfg.MOCO_TRANSFER.METRICS), **extra}


def flatten_results(results):
    flat = {}
    for group, values in (results or {}).items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{group}/{k}"] = float(v)
    return flat


def main(args):
    cfg = setup_cfg(args.task, args.weights, args.seed, args.scale, args.opts, args.output,
                    args.num_gpus, args.runs)
    if args.dry_run:
        print(cfg.dump())
        return None
    datasets.check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if cfg.MODEL.DENSEPOSE_ON:
        from transfer.densepose.config import densepose_data_dir

        densepose_data_dir(cfg.DENSEPOSE.DATA)  # a configured folder must exist
    default_setup(cfg, args)
    # this project's messages (checkpoint fallback, sampling) in the run's log.txt too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="transfer")
    console.quiet_run(cfg)  # quiet console: logs to the run's files, a progress bar
    status_path = os.path.join(cfg.OUTPUT_DIR, "status.json")
    if comm.is_main_process():
        write_json_atomic(run_record(cfg, state="running", started=time.time()), status_path)
    try:
        if args.eval_only:
            model = Trainer.build_model(cfg)
            checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
            checkpointer.load(checkpointer.readable_checkpoint() or cfg.MODEL.WEIGHTS)
            results = Trainer.test(cfg, model)
        else:
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=True)
            trainer.train()
            results = getattr(trainer, "_last_eval_results", None)
    except BaseException as e:
        if comm.is_main_process():
            state = "diverged" if isinstance(e, FloatingPointError) else "failed"
            if isinstance(e, KeyboardInterrupt):
                state = "interrupted"
            write_json_atomic(run_record(cfg, state=state, reason=f"{type(e).__name__}: {e}",
                                         traceback=traceback.format_exc()), status_path)
        raise
    if comm.is_main_process():
        flat = flatten_results(results)
        record = run_record(cfg, state="complete", finished=time.time(), metrics=flat,
                            results=results)
        write_json_atomic(record, os.path.join(cfg.OUTPUT_DIR, "results.json"))
        write_json_atomic(record, status_path)
        logger.info("results: %s", json.dumps(flat))
    return results


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="a task name (python -m transfer.tasks)")
    p.add_argument("--weights", default="random",
                   help="converted .pkl, NAME=path.pkl, 'supervised' (MSRA R-50) or 'random'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", default="full", help="full (the protocol) or smoke (tiny)")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto")
    p.add_argument("--output", default=None, help="run directory (default <runs>/<task>/...)")
    p.add_argument("--runs", default="runs", help="root of the run directories")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="detectron2 KEY VALUE overrides")
    return p


def run(argv=None):
    args = get_parser().parse_args(argv)
    if args.task is not None:
        from transfer.tasks import known_tasks

        if args.task not in known_tasks():
            raise SystemExit(f"unknown task '{args.task}'. Known tasks:\n  "
                             + "\n  ".join(known_tasks()))
    args.resume = True  # default_setup reads it
    args.config_file = ""
    if args.dry_run or args.num_gpus * args.num_machines == 1:
        return main(args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


def cli(argv=None):
    """run(), with the user's errors (a bad task, weights, dataset, override, image) as one
    line; any other exception is a bug and keeps its traceback."""
    try:
        return run(argv)
    except (UserError, datasets.DatasetMissing) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    cli()
