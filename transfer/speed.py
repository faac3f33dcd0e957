"""CPU speed defaults of a training run (issue #17), kept apart from the Trainer so that the
Trainer only calls them.

- ``OMP_WAIT_POLICY=PASSIVE`` (set in transfer/__init__.py and pretrain/__init__.py, before
  torch loads OpenMP; an explicit value in the environment wins): OpenMP threads that finish
  an op early sleep instead of spinning. With spinning threads, any other busy process on a
  2-core machine (data workers, a second job) turns every parallel op into a wait for a
  descheduled thread; a measured 8.5 s vs 0.7 s per demo iteration on a loaded machine.

- ``foreach_sgd``: SGD's multi-tensor update (``foreach``). PyTorch turns it on by default on
  CUDA only; on a CPU the per-tensor loop over ~200 tensors costs ~10% of a small-model step.
  Same arithmetic, the same updates.
- ``writer_period``: detectron2's writers (console line, metrics.json, TensorBoard) every
  20 iterations, its default, or every iteration for runs shorter than 40 iterations.
- ``apply_speed_defaults``: no data-loader workers for small images on a CPU: decoding and
  augmenting a ~128 px image takes about a millisecond, while two worker processes compete
  with the main process' intra-op threads for the same cores.
"""
import os

FOREACH = True  # tools/bench_demo.py turns it off to measure the previous behaviour


def foreach_sgd(optimizer):
    if FOREACH and isinstance(optimizer, __import__("torch").optim.SGD):
        for group in optimizer.param_groups:
            group["foreach"] = True
        optimizer.defaults["foreach"] = True
    return optimizer


def writer_period(cfg):
    return 20 if cfg.SOLVER.MAX_ITER >= 40 else 1


def small_images(cfg):
    return max(cfg.INPUT.MIN_SIZE_TRAIN) <= 256 and cfg.INPUT.MAX_SIZE_TRAIN <= 512


def apply_speed_defaults(cfg):
    """On a CPU, small images: load the data in the main process (cfg must be unfrozen)."""
    if cfg.MODEL.DEVICE == "cpu" and small_images(cfg) and \
            not os.environ.get("MOCO_TRANSFER_KEEP_WORKERS"):
        cfg.DATALOADER.NUM_WORKERS = 0
    return cfg
