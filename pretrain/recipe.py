"""The paper's augmentation recipes as data, and the per-view parameter draw of the split path.

MoCo v1: RandomResizedCrop(scale 0.2-1), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)
always, flip. MoCo v2 ("aug+", from SimCLR): RandomResizedCrop(scale 0.2-1), ColorJitter(0.4,
0.4, 0.4, 0.1) with p 0.8, RandomGrayscale(0.2), Gaussian blur sigma 0.1-2.0 with p 0.5, flip.

`draw_view` draws one view's parameters with torchvision's own `get_params` and the same random
calls, in the same order, as the PIL pipeline `loader.moco_augmentation` builds from the same
recipe. Under the same seed (ImageFiles seeds by (seed, epoch, index)) both paths therefore
draw identical parameters, which the fidelity tests use to compare them image for image.
"""
import dataclasses
import functools

import torch
import torchvision.transforms as T

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class Recipe:
    scale: tuple = (0.2, 1.0)  # RandomResizedCrop area fraction; ratio: torchvision's 3/4-4/3
    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue strengths
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    gray_first: bool = False  # v1 converts to grayscale before the jitter
    flip_p: float = 0.5


RECIPES = {
    "v2": Recipe(),
    "v1": Recipe(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, blur_p=0.0, gray_first=True),
}


def recipe(version):
    return RECIPES[version]


@functools.lru_cache(maxsize=None)
def _jitter_ranges(strengths):
    """ColorJitter's factor ranges: [1 - s, 1 + s] (hue: [-s, s]); built once per recipe."""
    cj = T.ColorJitter(*strengths)
    return cj.brightness, cj.contrast, cj.saturation, cj.hue


def _applied(p):
    """Whether a RandomApply/RandomGrayscale/RandomHorizontalFlip with probability p fires:
    one torch.rand(1) draw, as torchvision makes it (always drawn, also for p = 1)."""
    return bool(torch.rand(1) < p)


def draw_view(img, r):
    """One view's parameters, drawn from the global torch RNG in the PIL pipeline's order.

    `img` is any PIL image of the source size (it need not be decoded). Returns a dict: crop
    (top, left, height, width) in source pixels, flip, and the colour parameters: jitter (bool),
    order (the 4 jitter ops' indices into JITTER_OPS, in application order), factors
    (brightness, contrast, saturation, hue), gray, blur, sigma."""
    crop = T.RandomResizedCrop.get_params(img, list(r.scale), list(r.ratio))
    jitter, order, factors = False, [0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0]
    gray = False

    def draw_jitter():
        nonlocal jitter, order, factors
        # RandomApply fires when rand <= p (`if p < rand: skip`); p = 1 is never skipped
        if r.jitter_p >= 1.0 or not bool(r.jitter_p < torch.rand(1)):
            idx, *drawn = T.ColorJitter.get_params(*_jitter_ranges(r.jitter))
            # a strength of 0 draws nothing (None): the op's neutral factor
            jitter, order = True, idx.tolist()
            factors = [n if f is None else f for f, n in zip(drawn, factors)]

    if r.gray_first:
        gray = _applied(r.gray_p)
        draw_jitter()
    else:
        draw_jitter()
        gray = _applied(r.gray_p)
    blur, sigma = False, 0.0
    if r.blur_p > 0 and not bool(r.blur_p < torch.rand(1)):
        lo, hi = r.blur_sigma
        blur, sigma = True, lo + (hi - lo) * torch.rand(1).item()
    flip = _applied(r.flip_p)
    return {"crop": crop, "flip": flip, "jitter": jitter, "order": order,
            "factors": [float(f) for f in factors], "gray": gray, "blur": blur,
            "sigma": float(sigma)}
