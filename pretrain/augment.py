"""The device part of the split augmentation: colour jitter, grayscale, Gaussian blur and
normalisation of a batch of uint8 views (pretrain/views.py), each sample with its own parameters,
in float32 on the training device (the GPU in real use, the CPU in tests and CPU runs).

The ops are kornia's torchvision-compatible ones (per-sample factors); the per-sample random order
of the four jitter ops (torchvision draws a permutation per image) is kept by applying, at each of
the four positions, each op to the samples that have it there. What differs from the PIL path
(`--augment-on cpu`), measured by tests/test_augment.py:
- everything runs in float32, not rounded to uint8 after each op;
- contrast and saturation blend with the exact grayscale (PIL: the integer luma, and the
  contrast mean rounded to an integer);
- hue is shifted in float HSV (PIL: uint8 HSV, the shift truncated to 1/255 of a turn);
- blur is a true Gaussian truncated at 3 sigma (a 13-tap kernel for sigma <= 2), its edge pixels
  repeated past the border as PIL's are (PIL: three passes of an extended box filter that
  approximates the Gaussian; torchvision's tensor blur reflects the border instead).
"""
import math

import kornia
import torch
import torchvision.transforms.v2.functional as TF

from pretrain.loader import IMAGENET_MEAN, IMAGENET_STD
from pretrain.recipe import recipe


def adjust_hue_turns(x, turns):
    """torchvision's hue factor (a fraction of a turn) through kornia's (radians)."""
    return kornia.enhance.adjust_hue(x, turns * (2 * math.pi))


# in the order of recipe.JITTER_OPS: brightness, contrast, saturation, hue
JITTER = (kornia.enhance.adjust_brightness_accumulative,
          kornia.enhance.adjust_contrast_with_mean_subtraction,
          kornia.enhance.adjust_saturation_with_gray_subtraction,
          adjust_hue_turns)


def blur_kernel_size(max_sigma):
    """Odd kernel covering +-3 sigma of the largest sigma (13 taps for 2.0)."""
    return 2 * math.ceil(3 * max_sigma) + 1


class BatchAugment:
    """view batch (dict of stacked tensors from the loader) -> normalised float32 batch on
    `device`. The selections are made on the CPU, where the loader's parameters are, so the
    device never waits on a host sync."""

    def __init__(self, version, device):
        self.recipe, self.device = recipe(version), torch.device(device)
        self.kernel = blur_kernel_size(self.recipe.blur_sigma[1])

    def to_device(self, t):
        return t.to(self.device, non_blocking=True)

    def __call__(self, view):
        x = self.to_device(view["image"]).float().div_(255)
        if self.recipe.gray_first:
            x = self.grayscale(x, view["gray"])
            x = self.jitter(x, view["jitter"], view["order"], view["factors"])
        else:
            x = self.jitter(x, view["jitter"], view["order"], view["factors"])
            x = self.grayscale(x, view["gray"])
        x = self.blur(x, view["blur"], view["sigma"])
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def jitter(self, x, on, order, factors):
        """Each selected sample gets the four ops in its own order, with its own factors."""
        for position in range(order.shape[1]):
            for op, fn in enumerate(JITTER):
                sel = (on & (order[:, position] == op)).nonzero().squeeze(1)
                if len(sel):
                    d = self.to_device(sel)
                    x[d] = fn(x[d], self.to_device(factors[sel, op]))
        return x

    def grayscale(self, x, on):
        sel = on.nonzero().squeeze(1)
        if len(sel):
            d = self.to_device(sel)
            x[d] = kornia.color.rgb_to_grayscale(x[d]).expand(-1, 3, -1, -1)
        return x

    def blur(self, x, on, sigma):
        sel = on.nonzero().squeeze(1)
        if len(sel):
            d = self.to_device(sel)
            s = self.to_device(sigma[sel]).unsqueeze(1).expand(-1, 2)
            x[d] = kornia.filters.gaussian_blur2d(x[d], (self.kernel, self.kernel), s,
                                                  border_type="replicate")
        return x
