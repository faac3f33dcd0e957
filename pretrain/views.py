"""The CPU part of the split augmentation (`--augment-on device`, the default): decode, the
random resized crops resized to the crop size as uint8, the flips. Each view's colour parameters
(jitter, grayscale, blur), drawn here with its crop, travel with it to pretrain/augment.py, which
applies them in batches on the training device.

A JPEG is decoded at reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling, PIL's `draft`)
when every crop of the image still spans at least the crop size at that scale, so the resize
that follows never upsamples. At 224 px most ImageNet crops are below twice the crop size and
decode whole; at smaller crop sizes and on larger photos most decode reduced.
"""
import math

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pretrain.recipe import draw_view, recipe

DRAFT_SCALES = (8, 4, 2)  # libjpeg's DCT scalings that PIL's draft picks from


def draft_scale(crops, size):
    """The largest JPEG reduction at which every crop (top, left, height, width) keeps at least
    `size` pixels on each side; 1 if none."""
    smallest = min(min(h, w) for _, _, h, w in crops)
    return next((s for s in DRAFT_SCALES if smallest >= s * size), 1)


class SplitViews:
    """`decode(file)` then `crop(decoded)`: `views` uint8 views of one image, each a dict
    {image: uint8 (3, size, size), jitter, order, factors, gray, blur, sigma} (tensors; the
    loader's collate stacks them into batches)."""

    def __init__(self, version, size, views=2, draft=True):
        self.recipe, self.size, self.views, self.draft = recipe(version), size, views, draft

    def decode(self, f):
        """Open, draw every view's parameters (from the source size, before decoding), decode
        (at reduced scale where the crops allow). Returns (image, plans, scale)."""
        img = Image.open(f)
        plans = [draw_view(img, self.recipe) for _ in range(self.views)]
        scale = 1
        if self.draft:
            s = draft_scale([p["crop"] for p in plans], self.size)
            if s > 1:
                w, h = img.size
                got = img.draft(None, (w // s, h // s))  # None where the format cannot
                scale = round(w / got[1][2]) if got else 1
        if img.mode not in ("RGB", "L"):  # CMYK, palette, 16-bit, ...: as decode_rgb does
            img = img.convert("RGB")
        img.load()
        return img, plans, scale

    def crop(self, decoded):
        img, plans, scale = decoded
        return [self.view(img, p, scale) for p in plans]

    def view(self, img, p, scale):
        top, left, h, w = p["crop"]
        # cut first, then resize, as torchvision's resized_crop does (PIL's resize(box=) would
        # filter with pixels outside the crop); reduced scale: the pixels that hold the crop
        x0, y0 = math.floor(left / scale), math.floor(top / scale)
        x1, y1 = math.ceil((left + w) / scale), math.ceil((top + h) / scale)
        box = (left / scale - x0, top / scale - y0, (left + w) / scale - x0,
               (top + h) / scale - y0)
        out = img.crop((x0, y0, x1, y1)).resize((self.size, self.size), Image.BILINEAR,
                                                box=box)
        if p["flip"]:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return {"image": TF.pil_to_tensor(out), **colour_params(p)}


def colour_params(p):
    """The parameters the device part needs, as tensors."""
    return {"jitter": torch.tensor(p["jitter"]), "order": torch.tensor(p["order"]),
            "factors": torch.tensor(p["factors"], dtype=torch.float32),
            "gray": torch.tensor(p["gray"]), "blur": torch.tensor(p["blur"]),
            "sigma": torch.tensor(p["sigma"], dtype=torch.float32)}
