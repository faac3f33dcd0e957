"""DensePose-COCO annotations of one person, kept relative to its box.

Official format (per COCO annotation of a person): ``dp_x``, ``dp_y`` (point coordinates in the
box's 256x256 frame), ``dp_I`` (chart index 1..24), ``dp_U``, ``dp_V`` (chart coordinates in
[0, 1]) and ``dp_masks``: 14 entries, one per coarse body part, each a COCO RLE of a 256x256
mask in the same box frame (or an empty list when the part is not visible). Because everything
is relative to the box, resizing the image moves points and masks with the box; a horizontal
flip mirrors the frame and swaps left/right labels (chart U/V need the UV symmetry file).
"""
import functools

import numpy as np
import torch

N_PARTS = 14  # coarse parts of the masks
N_CHARTS = 24  # fine charts with U/V coordinates
FRAME = 256.0  # the box frame points and masks are given in

# left/right swaps under a horizontal flip (index = label, 0 = background)
MASK_LABEL_SYMMETRIES = [0, 1, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 14]
POINT_LABEL_SYMMETRIES = [0, 1, 2, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 18, 17, 20,
                          19, 22, 21, 24, 23]
DP_KEYS = ("dp_x", "dp_y", "dp_I", "dp_U", "dp_V", "dp_masks")


def has_densepose(anno):
    return "dp_x" in anno and len(anno["dp_x"]) > 0


def decode_part_masks(dp_masks):
    """14 RLEs (256x256) -> one uint8 label map (0 background, 1..14 parts; later parts win)."""
    from pycocotools import mask as mask_util

    labels = np.zeros((int(FRAME), int(FRAME)), dtype=np.uint8)
    for part, rle in enumerate(dp_masks, start=1):
        if not rle:
            continue
        rle = dict(rle)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        labels[mask_util.decode(rle) > 0] = part
    return labels


def encode_part_masks(labels):
    """The inverse of decode_part_masks: a 256x256 label map -> 14 RLEs (official format)."""
    from pycocotools import mask as mask_util

    out = []
    for part in range(1, N_PARTS + 1):
        m = np.asfortranarray((labels == part).astype(np.uint8))
        if not m.any():
            out.append([])
            continue
        rle = mask_util.encode(m)
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out


class DensePoseData:
    """Points (x, y in the 256 box frame; chart i; u, v) and the part label map of one person."""

    def __init__(self, x, y, i, u, v, segm):
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.float32)
        self.i = torch.as_tensor(i, dtype=torch.int64)
        self.u = torch.as_tensor(u, dtype=torch.float32)
        self.v = torch.as_tensor(v, dtype=torch.float32)
        self.segm = torch.as_tensor(segm, dtype=torch.uint8)

    @classmethod
    def from_annotation(cls, anno):
        return cls(anno["dp_x"], anno["dp_y"], anno["dp_I"], anno["dp_U"], anno["dp_V"],
                   decode_part_masks(anno["dp_masks"]))

    def hflip(self, uv_symmetries):
        """Mirror the frame; swap left/right labels; map U/V through the symmetry tables."""
        self.x = FRAME - self.x
        self.segm = torch.as_tensor(
            np.asarray(MASK_LABEL_SYMMETRIES, dtype=np.uint8)[self.segm.flip(1).numpy()])
        old = self.i.clone()
        u, v = self.u.clone(), self.v.clone()
        for new in range(1, N_CHARTS + 1):
            sel = old == POINT_LABEL_SYMMETRIES[new]
            if not sel.any():
                continue
            self.i[sel] = new
            uu = (u[sel] * 255).long().clamp(0, 255)
            vv = (v[sel] * 255).long().clamp(0, 255)
            self.u[sel] = uv_symmetries["U"][new - 1][vv, uu]
            self.v[sel] = uv_symmetries["V"][new - 1][vv, uu]
        return self

    def to(self, device):
        for k in ("x", "y", "i", "u", "v", "segm"):
            setattr(self, k, getattr(self, k).to(device))
        return self


class DensePoseList:
    """Per-instance DensePoseData (None for persons without annotations) as an Instances field:
    supports len() and indexing by int, slice, bool mask or index tensor."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        if isinstance(item, int):
            return self.items[item]
        if isinstance(item, slice):
            return DensePoseList(self.items[item])
        item = torch.as_tensor(item)
        if item.dtype == torch.bool:
            item = item.nonzero().flatten()
        return DensePoseList([self.items[int(k)] for k in item.flatten().tolist()])

    def has_data(self):
        return torch.tensor([d is not None for d in self.items], dtype=torch.bool)

    def to(self, device):
        return DensePoseList([d if d is None else d.to(device) for d in self.items])


@functools.lru_cache(maxsize=2)
def load_uv_symmetries(path):
    """The official UV_symmetry_transforms.mat: cell arrays U_transforms / V_transforms (1x24),
    each 256x256 indexed [v*255, u*255], giving the mirrored chart coordinate. Read once per
    process (the training and PreciseBN loaders share the tables; they are never modified)."""
    from scipy.io import loadmat

    data = loadmat(path)
    try:
        return {k: [torch.as_tensor(np.asarray(data[f"{k}_transforms"][0, c], dtype=np.float32))
                    for c in range(N_CHARTS)] for k in ("U", "V")}
    except (KeyError, IndexError) as e:
        raise ValueError(f"'{path}' is not a DensePose UV symmetry file (expected cell arrays "
                         f"U_transforms and V_transforms of 24 256x256 tables): {e}") from e
