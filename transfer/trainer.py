"""The Trainer: detectron2's DefaultTrainer with the harness's data, evaluation and weights.

- data: each model family's registered mapper (``datasets.build_mapper``) under a loader whose
  batches and augmentations are a function of (seed, iteration, sample) (``sampling.py``);
- evaluation: the dataset's registered evaluator (``evaluators.py``);
- weights: ``TransferCheckpointer`` for pretrained weights, checkpoints and resume
  (``checkpoint.py``); the optimizer is checkpointed too, so a resumed run is the same run;
- PreciseBN on its own deterministic stream, averaged over processes.
"""
import logging
import os
import weakref

import torch
import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, hooks
from fvcore.nn.precise_bn import get_bn_modules

from transfer import console, sampling, speed
from transfer.checkpoint import TransferCheckpointer
from transfer.datasets import build_mapper
from transfer.evaluators import build_evaluator
from transfer.run_dir import METRICS_FILE, trim_metrics

logger = logging.getLogger("transfer")


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
        # DefaultTrainer builds its checkpointer just before the hooks; the periodic
        # checkpointer hook must get the atomic one
        self.checkpointer = self.checkpointer_for(self.model, self.cfg,
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
        pretrained weights (strictly: checkpoint.py) and start at iteration 0."""
        path = self.checkpointer.readable_checkpoint() if resume else None
        if path:
            self.checkpointer.load(path)
            self.start_iter = self.iter + 1
        else:
            self.checkpointer.load(self.cfg.MODEL.WEIGHTS, checkpointables=[])
            self.start_iter = 0
        self._trainer.data_loader.start_iter = self.start_iter
        if comm.is_main_process():
            trim_metrics(os.path.join(self.cfg.OUTPUT_DIR, METRICS_FILE), self.start_iter)

    @classmethod
    def evaluate_saved(cls, cfg):
        """Evaluation only: the run's newest readable checkpoint, else MODEL.WEIGHTS."""
        model = cls.build_model(cfg)
        checkpointer = cls.checkpointer_for(model, cfg)
        checkpointer.load(checkpointer.readable_checkpoint() or cfg.MODEL.WEIGHTS)
        return cls.test(cfg, model)
