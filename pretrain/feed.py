"""How pretraining's images reach the model: the augmentation path (`--augment-on`), the
DataLoader settings, and the data ceiling printed at start-up.

- `--augment-on device` (default): the loader's workers decode, crop and flip
  (pretrain/views.py); colour jitter, grayscale, blur and normalisation run in batches on the
  training device (pretrain/augment.py).
- `--augment-on cpu`: the PIL pipeline, every op in the workers (pretrain/loader.py).
Both draw the same parameters for the same (seed, epoch, image index).
"""
import time

from pretrain import augment, loader, views

PATHS = ("device", "cpu")
CUDA_PREFETCH = 4  # batches in flight per worker: evens out per-batch decode time on a GPU


def pipeline(data, version, size, seed, augment_on, device):
    """(dataset, finish): the dataset yields (views, index of the image read: the memory bank's
    entry); finish(view batch) is the normalised float32 batch on `device`."""
    if augment_on == "cpu":
        transform = loader.TwoCropsTransform(loader.moco_augmentation(version, size))
        return (loader.ImageFiles(data, transform, seed=seed, target="index"),
                lambda batch: batch.to(device, non_blocking=True))
    split = views.SplitViews(version, size)
    return (loader.ImageFiles(data, split.crop, seed=seed, decode=split.decode, target="index"),
            augment.BatchAugment(version, device))


def loader_settings(device, workers, cores_per_process, cpu_default=8):
    """DataLoader keyword arguments. With CUDA: pinned memory, persistent workers, prefetch, and
    by default a worker on every core of this process but one (the one that drives the GPU).
    On a CPU, where the model shares the cores: `cpu_default` workers, started each epoch."""
    cuda = device.type == "cuda"
    if workers is None:
        workers = max(1, cores_per_process - 1) if cuda else cpu_default
    settings = {"num_workers": workers, "pin_memory": cuda}
    if workers > 0:
        settings.update(persistent_workers=cuda, prefetch_factor=CUDA_PREFETCH if cuda else 2)
    return settings


def measure_rate(dataset, images=32):
    """Images/s of the per-image loader work (decode, transform) in this process, timed on the
    first `images` images of epoch 0."""
    n = min(images, len(dataset))
    t = time.perf_counter()
    for i in range(n):
        dataset[(0, i)]
    return n / (time.perf_counter() - t)


def ceiling_line(rate, workers, augment_on):
    """The start-up line: what the loader can deliver, so a user sees when data is the limit."""
    where = ("decode, crop, flip in the workers; colour, blur, normalise on the device"
             if augment_on == "device" else "every op in the workers (PIL)")
    return (f"data ceiling ~{rate * max(workers, 1):.0f} images/s per process ({augment_on} "
            f"augmentation: {where}; {rate:.0f} images/s per worker measured at start-up x "
            f"{workers or 'no'} workers{', the main process loads' if not workers else ''}); "
            "a faster model step waits on data")
