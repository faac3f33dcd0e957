"""The Trainer: detectron2's DefaultTrainer with the harness's data, evaluation and weights.

- data: each model family's registered mapper (``datasets.build_mapper``) under a loader whose
  batches and augmentations are a function of (seed, iteration, sample) (``sampling.py``);
- evaluation: the dataset's registered evaluator (``evaluators.py``);
- weights: ``TransferCheckpointer`` for pretrained weights, checkpoints and resume
  (``checkpoint.py``); the optimizer is checkpointed too, so a resumed run is the same run;
- PreciseBN on its own deterministic stream, with the global batch's statistics
  (``precise_bn.py``);
- DDP fitted to the device (gloo processes on a CPU as well as NCCL on GPUs).
"""
import logging
import os
import weakref

import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import verify_results
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from transfer import sampling, speed
from transfer.checkpoint import TransferCheckpointer
from transfer.console import Console, progress_hooks
from transfer.datasets import build_mapper
from transfer.evaluators import build_evaluator
from transfer.precise_bn import GlobalPreciseBN
from transfer.run_dir import METRICS_FILE, trim_metrics

logger = logging.getLogger("transfer")


class Trainer(DefaultTrainer):
    def __init__(self, cfg, console=Console()):
        """DefaultTrainer's construction, with the DDP wrapper fitted to the device: detectron2
        v0.6 always gives DDP ``device_ids=[local rank]``, which torch refuses for a model on a
        CPU (gloo processes). The config comes resolved (``config.setup_cfg`` already applied
        ``auto_scale_workers``); `console` is how the run talks to the terminal."""
        TrainerBase.__init__(self)
        self.console = console
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = cfg.MODEL.DEVICE.startswith("cuda")
        model = create_ddp_model(model, broadcast_buffers=False,
                                 device_ids=[comm.get_local_rank()] if on_gpu else None)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.checkpointer_for(model, cfg, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.eval_results = None
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return speed.foreach_sgd(super().build_optimizer(cfg, model))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg, stream=sampling.TRAIN, num_workers=None):
        """The task's mapper under a loader whose batches and augmentations are a function
        of (seed, iteration, sample) (transfer/sampling.py): resumable exactly."""
        return sampling.build_train_loader(cfg, build_mapper(cfg, True), stream, num_workers)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @staticmethod
    def checkpointer_for(model, cfg, **checkpointables):
        model = model.module if hasattr(model, "module") else model
        return TransferCheckpointer(model, cfg.OUTPUT_DIR,
                                    trust=cfg.MOCO_TRANSFER.TRUST_CHECKPOINT, **checkpointables)

    def build_hooks(self):
        """DefaultTrainer's hooks in its order, built here rather than replaced after the fact:
        per-iteration seeds first; PreciseBN with the global batch's statistics on its own
        deterministic stream (precise_bn.py), before the checkpointer so that the saved
        weights carry them; the evaluation keeps its results (``eval_results``); metrics.json
        every iteration (``metrics_writer``), the console line and TensorBoard every
        ``speed.writer_period`` iterations; the quiet console's progress."""
        cfg = self.cfg
        hook_list = [sampling.SeedEachIteration(cfg.SEED), hooks.IterationTimer(),
                     hooks.LRScheduler()]
        if cfg.TEST.PRECISE_BN.ENABLED:
            hook_list.append(GlobalPreciseBN(
                cfg.TEST.EVAL_PERIOD, self.model,
                self.build_train_loader(cfg, sampling.PRECISE_BN, num_workers=0),
                cfg.TEST.PRECISE_BN.NUM_ITER))
        if comm.is_main_process():
            hook_list.append(hooks.PeriodicCheckpointer(self.checkpointer,
                                                        cfg.SOLVER.CHECKPOINT_PERIOD))
        hook_list.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self.evaluate))
        if comm.is_main_process():
            # the progress bar (or the suite's progress file) belongs to the main process
            hook_list += [self.metrics_writer(),
                          hooks.PeriodicWriter(self.build_writers(),
                                               period=self.writer_period()),
                          *progress_hooks(cfg, self.console)]
        return hook_list

    def writer_period(self):
        """Iterations between two writes of the console line and TensorBoard."""
        return speed.writer_period(self.cfg)

    def build_writers(self):
        """detectron2's default writers but metrics.json (``metrics_writer``)."""
        return [CommonMetricPrinter(self.max_iter), TensorboardXWriter(self.cfg.OUTPUT_DIR)]

    def metrics_writer(self):
        """metrics.json: one record per iteration, each loss as that iteration computed it
        (window 1: no median over the last 20), whatever the console's period: the curves
        (results/report.py) and the cost (transfer/cost.py) read every iteration."""
        return metrics_writer(self.cfg.OUTPUT_DIR)

    def evaluate(self):
        """The evaluation hook's call: evaluate on the test sets and keep the results."""
        self.eval_results = self.test(self.cfg, self.model)
        return self.eval_results

    def train(self):
        """Train from ``start_iter``; returns the last evaluation's results (None where
        evaluation was off), on every process (only the main one's are complete)."""
        TrainerBase.train(self, self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            verify_results(self.cfg, self.eval_results)
        return self.eval_results

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
        pretrained weights (strictly: checkpoint.py) and start at iteration 0."""
        path = self.checkpointer.readable_checkpoint() if resume else None
        if path:
            self.checkpointer.load(path)
            self.start_iter = self.iter + 1
        else:
            self.checkpointer.load(self.cfg.MODEL.WEIGHTS, checkpointables=[])
            self.start_iter = 0
        self.data_loader.start_iter = self.start_iter
        if comm.is_main_process():
            trim_metrics(os.path.join(self.cfg.OUTPUT_DIR, METRICS_FILE), self.start_iter)

    @classmethod
    def evaluate_saved(cls, cfg):
        """Evaluation only: the run's newest readable checkpoint, else MODEL.WEIGHTS."""
        model = cls.build_model(cfg)
        checkpointer = cls.checkpointer_for(model, cfg)
        checkpointer.load(checkpointer.readable_checkpoint() or cfg.MODEL.WEIGHTS)
        return cls.test(cfg, model)


def metrics_writer(output_dir):
    """The hook that appends every iteration's scalars, unsmoothed, to <output_dir>/metrics.json."""
    return hooks.PeriodicWriter([JSONWriter(os.path.join(output_dir, METRICS_FILE),
                                            window_size=1)], period=1)
