"""Images in, augmented views out: folders, MoCo v1/v2 augmentations, a resumable sampler."""
import contextlib
import logging
import os

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from pretrain.recipe import recipe

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class GaussianBlur:
    """Gaussian blur with sigma drawn uniformly from `sigma` (MoCo v2 / SimCLR)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        lo, hi = self.sigma
        s = lo + (hi - lo) * torch.rand(1).item()
        return img.filter(ImageFilter.GaussianBlur(radius=s))


def moco_augmentation(version, size=224):
    """The PIL pipeline of the paper's recipe (pretrain/recipe.py): every op on the CPU, one
    image at a time (`--augment-on cpu`)."""
    r = recipe(version)
    crop = T.RandomResizedCrop(size, scale=r.scale, ratio=r.ratio)
    jitter = T.ColorJitter(*r.jitter)
    if r.jitter_p < 1.0:
        jitter = T.RandomApply([jitter], p=r.jitter_p)
    gray = T.RandomGrayscale(p=r.gray_p)
    ops = [crop] + ([gray, jitter] if r.gray_first else [jitter, gray])
    if r.blur_p > 0:
        ops.append(T.RandomApply([GaussianBlur(r.blur_sigma)], p=r.blur_p))
    return T.Compose(ops + [T.RandomHorizontalFlip(r.flip_p), T.ToTensor(),
                            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def supervised_augmentation(size=224):
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size=224):
    resize = int(round(size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoCropsTransform:
    """Two independent augmentations of one image: the query and the key."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform(x)]


def list_images(root):
    """(paths, labels, classes) for an ImageFolder tree (class = first sub-folder) or a flat
    folder of images (one class)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder '{root}' not found: expected an ImageFolder tree (root/<class>/*.jpg) "
            "or a flat folder of images"
        )
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    flat = sorted(f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS))
    if flat:
        if paths:
            logger.warning("%s has both class folders and loose images; loose images get "
                           "their own class '.'", root)
        classes = classes + ["."]
        paths += [os.path.join(root, f) for f in flat]
        labels += [len(classes) - 1] * len(flat)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under '{root}'")
    return paths, labels, classes


def decode_rgb(f):
    """The whole image, decoded and converted to RGB (grayscale, CMYK, palette, ...)."""
    return Image.open(f).convert("RGB")


@contextlib.contextmanager
def random_stream(seed, epoch, index):
    """The global torch RNG seeded by (seed, epoch, index) inside, the caller's state restored
    after: what every augmentation of one sample draws from."""
    state = torch.get_rng_state()
    # the CPU generator only: torch.manual_seed would also queue a seeding of every lazy
    # accelerator generator (each with a captured stack trace), a sixth of the split path's time
    torch.default_generator.manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class ImageFiles(torch.utils.data.Dataset):
    """Images from a folder: `transform(decode(file))` per sample.

    Unreadable files are reported once with their path and replaced by the next readable image.
    Each sample is `(transform(image), target)`; `target` is the image's label, or with
    `target="index"` the index of the image actually read (pretraining: the memory bank writes
    a sample's features into the entry of the image they came from, not into the entry of an
    unreadable one that it replaced).
    With `seed`, the random augmentation of sample i in epoch e is a function of (seed, e, i):
    identical whatever the worker count and across a kill and resume. The epoch is the last
    `set_epoch`, or travels with the index: `dataset[(epoch, i)]` (what `ResumableSampler`
    yields, so that persistent workers, which keep their copy of the dataset, see it).
    `decode` (default `decode_rgb`) turns the open file into what `transform` takes; it may
    draw random numbers (the split path draws the crops first, to decode at reduced scale).
    """

    TARGETS = ("label", "index")

    def __init__(self, root, transform, seed=None, decode=decode_rgb, target="label"):
        if target not in self.TARGETS:
            raise ValueError(f"target {target!r} is not one of {self.TARGETS}")
        self.root, self.target = root, target
        self.paths, self.labels, self.classes = list_images(root)
        self.transform, self.decode = transform, decode
        self.seed = seed
        self.epoch = 0
        self._bad = set()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            if self.paths[i] in self._bad:
                continue
            try:
                with open(self.paths[i], "rb") as f:
                    return i, self.decode(f)
            except Exception as e:  # truncated, not an image, permission, ...
                self._bad.add(self.paths[i])
                logger.warning("skipping unreadable image %s (%s: %s)", self.paths[i],
                               type(e).__name__, e)
        raise RuntimeError(f"no readable image in {self.root}")

    def __getitem__(self, index):
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        with (random_stream(self.seed, epoch, index) if self.seed is not None
              else contextlib.nullcontext()):
            i, img = self.load(index)
            return self.transform(img), (i if self.target == "index" else self.labels[i])


class ResumableSampler(torch.utils.data.Sampler):
    """Per-epoch permutation from (seed, epoch), sharded over ranks, that can start mid-epoch.
    Yields (epoch, dataset index) pairs (ImageFiles seeds each sample's augmentation by both).

    Each rank gets len(dataset) // (world_size * batch) full batches (drop_last semantics).
    """

    def __init__(self, n, batch_size, seed=0, rank=0, world_size=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = n // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} images are fewer than one global batch of "
                             f"{batch_size * world_size}")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.batches_per_epoch * self.batch_size
        mine = perm[: per_rank * self.world_size].view(-1, self.world_size)[:, self.rank]
        return iter((self.epoch, i) for i in mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
