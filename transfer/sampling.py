"""Training data and random draws that are a function of (seed, iteration, sample).

detectron2's TrainingSampler shuffles an infinite stream from a seed, its aspect-ratio grouping
consumes a variable number of samples per batch, and its data workers seed numpy/random from a
per-worker seed; none of this is in a checkpoint, so a resumed run restarts the data order and
the augmentations from the beginning. Here instead:

- ``IterationBatches``: the global batch of iteration ``i`` is fixed by (seed, i): epoch
  orders are permutations drawn from (seed, epoch) (repeat-factor sampling included), and
  aspect-ratio grouping fills two buckets from that stream. Resuming at ``start_iter`` replays
  the grouping on indices only (no image is read), then yields this process's share of each
  batch as (dataset index, sample seed) pairs; the sample seed is drawn from (seed, iteration,
  position in the global batch).
- ``SeededMapDataset``: seeds python/numpy/torch from the sample seed before calling the task's
  mapper (detectron2's augmentations draw from ``np.random``) and restores the caller's RNG
  state afterwards, so the result is the same in the main process and in any worker.
- ``SeedEachIteration``: a hook that seeds python/numpy/torch from (seed, iteration, rank)
  before each step, for the model's own draws (anchor and ROI sampling use ``torch.randperm``).

So a run resumed from the checkpoint of iteration k draws exactly what the uninterrupted run
drew from iteration k + 1 on, for any number of data workers and any checkpoint period.
"""
import contextlib
import itertools
import logging
import random

import numpy as np
import torch

import detectron2.utils.comm as comm
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.detection_utils import read_image
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.engine import HookBase

from transfer.errors import ConfigError, CorruptImage

logger = logging.getLogger(__name__)

# Streams of draws, kept apart by a tag in every derived seed.
TRAIN, PRECISE_BN = 1, 2
_EPOCH, _SAMPLE, _STEP, _RETRY, _LOADER = 11, 12, 13, 14, 15


def derive_seed(*keys):
    """A 32-bit seed that is a pure function of the integer keys."""
    return int(np.random.SeedSequence([int(k) % 2 ** 63 for k in keys]).generate_state(1)[0])


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_cpu_rng(seed):
    """Seed python/numpy/torch-CPU generators for the block, then restore the caller's state."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)


def epoch_order(num, seed, stream, epoch, repeat_factors=None):
    """Dataset indices of one epoch: a permutation drawn from (seed, stream, epoch).

    With repeat factors (LVIS' repeat-factor sampling), each index appears floor(r) times plus
    once more with probability frac(r), as in detectron2's RepeatFactorTrainingSampler."""
    rng = np.random.default_rng(derive_seed(seed, stream, _EPOCH, epoch))
    if repeat_factors is None:
        return rng.permutation(num)
    whole = np.floor(repeat_factors)
    reps = (whole + (rng.random(len(repeat_factors)) < repeat_factors - whole)).astype(np.int64)
    return rng.permutation(np.repeat(np.arange(len(repeat_factors)), reps))


class IterationBatches(torch.utils.data.Sampler):
    """Batch sampler: for each iteration from ``start_iter`` on, this process's share of the
    global batch, as a list of (dataset index, sample seed)."""

    def __init__(self, groups, total_batch_size, seed, stream=TRAIN, *, repeat_factors=None,
                 start_iter=0, rank=0, world_size=1):
        if total_batch_size % world_size:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH {total_batch_size} is not divisible by "
                              f"the {world_size} processes")
        self.group = groups  # the aspect-ratio bucket of every dataset index
        self.num = len(groups)
        self.total = total_batch_size
        self.per_rank = total_batch_size // world_size
        self.seed, self.stream, self.start_iter, self.rank = seed, stream, start_iter, rank
        self.repeat_factors = repeat_factors

    def global_batches(self):
        buckets = [[], []]
        for epoch in itertools.count():
            order = epoch_order(self.num, self.seed, self.stream, epoch, self.repeat_factors)
            for idx, g in zip(order.tolist(), self.group[order].tolist()):
                buckets[g].append(idx)
                if len(buckets[g]) == self.total:
                    yield buckets[g]
                    buckets[g] = []

    def __iter__(self):
        lo = self.rank * self.per_rank
        for it, batch in enumerate(self.global_batches()):
            if it < self.start_iter:
                continue
            yield [(idx, derive_seed(self.seed, self.stream, _SAMPLE, it, lo + k))
                   for k, idx in enumerate(batch[lo:lo + self.per_rank])]


def aspect_groups(dataset_dicts, grouping=True):
    """detectron2's AspectRatioGroupedDataset buckets: 0 landscape (w > h), 1 the rest; one
    bucket for all without grouping."""
    if not grouping:
        return np.zeros(len(dataset_dicts), dtype=np.int64)
    return np.array([int(d.get("width", 0) <= d.get("height", 0)) for d in dataset_dicts],
                    dtype=np.int64)


def image_readable(path):
    try:
        read_image(path)
        return True
    except (OSError, TypeError):
        return False


class SeededMapDataset(torch.utils.data.Dataset):
    """dataset[(index, sample_seed)] -> mapper(dataset_dicts[index]) with every random draw of
    the mapper fixed by the sample seed. A sample the mapper drops (returns None) is replaced
    by another index drawn from the same seed, as detectron2's MapDataset does at random."""

    def __init__(self, dataset_dicts, mapper):
        self._dicts = DatasetFromList(dataset_dicts, copy=False)  # serialized: fresh copies
        self._mapper = mapper

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, key):
        index, sample_seed = key
        for attempt in itertools.count():
            with isolated_cpu_rng(derive_seed(sample_seed, _RETRY, attempt)):
                record = self._dicts[index]
                try:
                    out = self._mapper(record)
                except OSError as e:  # PIL: unidentified or truncated image, unreadable file
                    if image_readable(record.get("file_name")):
                        raise  # not the image: a problem elsewhere keeps its traceback
                    raise CorruptImage(
                        f"cannot read image '{record.get('file_name')}' ({type(e).__name__}: "
                        f"{e}); replace the file or remove it from the dataset") from e
                if out is not None:
                    return out
                index = int(np.random.default_rng(
                    derive_seed(sample_seed, _RETRY, attempt)).integers(len(self)))
            if attempt == 2:
                logger.warning("the mapper dropped 3 samples in a row for sample seed %d",
                               sample_seed)


class DeterministicTrainLoader:
    """Iterable of this process's training batches (lists of mapped dicts), starting at
    iteration ``start_iter``.

    ``start_iter`` is read when iteration begins, not when ``iter()`` is called: detectron2's
    SimpleTrainer calls ``iter()`` in its constructor, before ``resume_or_load`` knows where
    the run resumes."""

    def __init__(self, dataset_dicts, mapper, total_batch_size, seed, stream=TRAIN, *,
                 num_workers=0, aspect_ratio_grouping=True, repeat_factors=None):
        self.dataset = SeededMapDataset(dataset_dicts, mapper)
        self.groups = aspect_groups(dataset_dicts, aspect_ratio_grouping)
        self.total_batch_size, self.seed, self.stream = total_batch_size, seed, stream
        self.num_workers = num_workers
        self.repeat_factors = repeat_factors
        self.start_iter = 0

    def batch_sampler(self):
        return IterationBatches(self.groups, self.total_batch_size, self.seed, self.stream,
                                repeat_factors=self.repeat_factors, start_iter=self.start_iter,
                                rank=comm.get_rank(), world_size=comm.get_world_size())

    def __iter__(self):  # a generator: nothing runs before the first next()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.batch_sampler(), num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            # the workers' base seed comes from this generator, not from the global one
            generator=torch.Generator().manual_seed(derive_seed(self.seed, self.stream,
                                                                _LOADER)))
        yield from loader


def build_train_loader(cfg, mapper, stream=TRAIN, num_workers=None):
    """The deterministic training loader of a config, with the task's mapper."""
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                       if cfg.MODEL.KEYPOINT_ON else 0),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        factors = None
    elif name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD).numpy()
    else:
        raise ConfigError(f"DATALOADER.SAMPLER_TRAIN '{name}': resumable training supports "
                          "TrainingSampler and RepeatFactorTrainingSampler")
    return DeterministicTrainLoader(
        dicts, mapper, cfg.SOLVER.IMS_PER_BATCH, cfg.SEED, stream,
        num_workers=cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, repeat_factors=factors)


class SeedEachIteration(HookBase):
    """Seeds python/numpy/torch from (seed, iteration, rank) before every training step."""

    def __init__(self, seed):
        self._seed = seed

    def before_step(self):
        seed_everything(derive_seed(self._seed, _STEP, self.trainer.iter, comm.get_rank()))
