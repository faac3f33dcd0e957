"""PreciseBN with the statistics of the global batch, whatever the number of processes.

fvcore's ``update_bn_stats`` (what detectron2's PreciseBN hook runs) recomputes each BN layer's
population mean and variance from ``running_mean``/``running_var`` after each forward, undoing
the Bessel correction with the batch size it sees: the layer's local input. Two things go wrong
with several processes:

- detectron2's ``NaiveSyncBatchNorm`` on more than one process records the *biased* variance
  of the global batch (torch's BN, on one process, the unbiased one), so fvcore's correction is
  applied to a variance that has none: the result is too small by (n - 1) / n, n the local
  count per channel (measured: 1/18 at res5 of 96-pixel images, 2 images per process);
- layers that do not synchronise (``BN``) give each process the statistics of its own share,
  and detectron2 saves and evaluates rank 0's.

``GlobalPreciseBN`` gives fvcore an unbiased variance to undo (rescaling, during the
recomputation only, what a synchronised layer records), then combines the processes' results
into the global batch's (mean of the means; mean of var + mean^2, minus the mean^2): on
processes whose BN layers synchronise they already agree and nothing changes. The batches come
from the deterministic loader's own stream (sampling.PRECISE_BN), fixed by the iteration it runs
after, so a resumed run recomputes the same statistics. tests/test_distributed.py checks the
result on 2 processes against 1 process on the same global batches.
"""
import contextlib
import logging

import torch
import detectron2.utils.comm as comm
from detectron2.engine import HookBase
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def unbiased_synced_variance(bn_layers):
    """While active, a NaiveSyncBatchNorm on several processes records the unbiased variance
    of its local count after each forward, as torch's BatchNorm does (what fvcore expects)."""
    if comm.get_world_size() == 1:
        yield
        return

    def rescale(module, inputs, output):
        n = inputs[0].numel() // inputs[0].shape[1]
        if n > 1:
            module.running_var.mul_(n / (n - 1))

    handles = [bn.register_forward_hook(rescale) for bn in bn_layers
               if isinstance(bn, NaiveSyncBatchNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def combine_over_processes(bn_layers):
    """Every process gets the statistics of the union of the processes' batches (equal
    shares): the mean of the means, and the mean of (var + mean^2) minus the mean^2."""
    world = comm.get_world_size()
    if world == 1:
        return
    for bn in bn_layers:
        stats = torch.stack([bn.running_mean, bn.running_var + bn.running_mean.square()])
        torch.distributed.all_reduce(stats)
        stats /= world
        bn.running_mean.copy_(stats[0])
        bn.running_var.copy_(stats[1] - stats[0].square())


class GlobalPreciseBN(HookBase):
    """detectron2's PreciseBN hook (every `period` iterations and after the last one), with the
    global batch's statistics (module docstring). `data_loader` is a
    ``sampling.DeterministicTrainLoader`` of its own stream."""

    def __init__(self, period, model, data_loader, num_iter):
        self.period, self.model, self.data_loader, self.num_iter = period, model, data_loader, \
            num_iter
        self.bn_layers = get_bn_modules(model)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self.period > 0 and next_iter % self.period
                                                  == 0):
            self.update_stats()

    def update_stats(self):
        if not self.bn_layers:
            return
        self.data_loader.start_iter = self.trainer.iter
        logger.info("running PreciseBN: %d iterations of the global batch", self.num_iter)
        with EventStorage(), unbiased_synced_variance(self.bn_layers):  # the model may log
            update_bn_stats(self.model, iter(self.data_loader), self.num_iter)
        combine_over_processes(self.bn_layers)
