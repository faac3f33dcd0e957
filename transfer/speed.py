"""CPU speed defaults of a training run (issue #17), kept apart from the Trainer so that the
Trainer only calls them.

- OpenMP threads that wait passively (every program's ``--omp-wait-policy``, passive by
  default: convert/runtime.py): OpenMP threads that finish an op early sleep instead of
  spinning. With spinning threads, any other busy process on a 2-core machine (data workers, a
  second job) turns every parallel op into a wait for a descheduled thread; a measured 8.5 s
  vs 0.7 s per demo iteration on a loaded machine.

- ``foreach_sgd``: SGD's multi-tensor update (``foreach``). PyTorch turns it on by default on
  CUDA only; on a CPU the per-tensor loop over ~200 tensors costs ~10% of a small-model step.
  Same arithmetic, the same updates.
- ``writer_period``: detectron2's console line and TensorBoard every 20 iterations, its
  default, or every iteration for runs shorter than 40 iterations (metrics.json gets every
  iteration whatever the period: trainer.metrics_writer).
- ``data_workers``: no data-loader workers for small images on a CPU: decoding and
  augmenting a ~128 px image takes about a millisecond, while two worker processes compete
  with the main process' intra-op threads for the same cores.
"""
import torch


def foreach_sgd(optimizer):
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            group["foreach"] = True
        optimizer.defaults["foreach"] = True
    return optimizer


def writer_period(cfg):
    return 20 if cfg.SOLVER.MAX_ITER >= 40 else 1


def small_images(cfg):
    return max(cfg.INPUT.MIN_SIZE_TRAIN) <= 256 and cfg.INPUT.MAX_SIZE_TRAIN <= 512


def data_workers(cfg, device):
    """DATALOADER.NUM_WORKERS on `device`: on a CPU with small images, none (the data is loaded
    in the main process); else the config's."""
    return 0 if device == "cpu" and small_images(cfg) else cfg.DATALOADER.NUM_WORKERS
