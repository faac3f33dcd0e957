"""A generated DensePose-COCO dataset in the official format, for tests and smoke runs.

    python -m transfer.densepose.fixture ROOT
    DETECTRON2_DATASETS=ROOT make transfer TASK=coco_densepose_fpn_s1x SCALE=smoke

Writes under ROOT (synthetic, labelled as such; formats are the official ones):
    coco/annotations/densepose_{train,valminusminival,minival}2014.json
    coco/{train2014,val2014}/COCO_<split>2014_<id:012d>.jpg
    densepose/UV_symmetry_transforms.mat          U/V mirror tables of the drawn figure
    densepose/SMPL_subdiv.mat, SMPL_SUBDIV_TRANSFORM.mat, Pdist_matrix.pkl
                                                  a flat test surface (not SMPL: exact
                                                  Euclidean geodesics, gps.grid_surface)

Each image shows people drawn from one symmetric figure of the 14 body parts (rectangles in the
box's 256x256 frame). The red channel encodes the part (PART_RED), green/blue the chart U/V, so
tests can check that points and masks stay on the right pixels. Annotated people carry points
(chart, U, V from the part's rectangle) and 14 RLE part masks; some people carry none.
"""
import json
import os
import sys

import numpy as np
from PIL import Image

from transfer.densepose import gps
from transfer.densepose.structures import N_CHARTS, encode_part_masks

# part -> (x0, y0, x1, y1) in the 256 frame; image-left = the person's right side
FIGURE = {
    14: (100, 4, 156, 52), 1: (84, 52, 172, 140),
    11: (56, 52, 84, 110), 10: (172, 52, 200, 110),  # upper arms right / left
    13: (56, 110, 84, 160), 12: (172, 110, 200, 160),  # lower arms
    2: (56, 160, 84, 180), 3: (172, 160, 200, 180),  # hands
    6: (88, 140, 126, 200), 7: (130, 140, 168, 200),  # upper legs
    8: (88, 200, 126, 240), 9: (130, 200, 168, 240),  # lower legs
    5: (84, 240, 126, 252), 4: (130, 240, 172, 252),  # feet
}
# the chart of each part's points (the head: chart 23 left half, 24 right half)
PART_CHART = {1: 1, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8, 8: 11, 9: 12, 10: 15, 11: 16,
              12: 19, 13: 20}
SPLITS = {"train": ("train2014", 10, 0), "valminusminival": ("val2014", 2, 100),
          "minival": ("val2014", 4, 200)}
IMAGE_SIZE = (320, 256)


def part_red(part):
    return 0 if part == 0 else 30 + 15 * part


def figure_labels():
    labels = np.zeros((256, 256), dtype=np.uint8)
    for part, (x0, y0, x1, y1) in FIGURE.items():
        labels[y0:y1, x0:x1] = part
    return labels


def chart_uv(part, x, y):
    """(chart, U, V) of a point (x, y) of the 256 frame lying on `part`."""
    x0, y0, x1, y1 = FIGURE[part]
    if part == 14:
        mid = (x0 + x1) / 2
        chart, x0, x1 = (23, x0, mid) if x < mid else (24, mid, x1)
    else:
        chart = PART_CHART[part]
    return chart, (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)


def figure_points(fractions=(0.25, 0.5, 0.75)):
    """Points of every chart on a grid of its rectangle (inside, away from the edges)."""
    rects = []
    for part, (x0, y0, x1, y1) in FIGURE.items():
        if part == 14:  # the head: two charts, one per half
            mid = (x0 + x1) / 2
            rects += [(part, (x0, y0, mid, y1)), (part, (mid, y0, x1, y1))]
        else:
            rects.append((part, (x0, y0, x1, y1)))
    pts = []
    for part, (x0, y0, x1, y1) in rects:
        for fy in fractions:
            for fx in fractions:
                x, y = x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)
                pts.append((x, y) + chart_uv(part, x, y))
    x, y, i, u, v = map(list, zip(*pts))
    return {"dp_x": x, "dp_y": y, "dp_I": [float(c) for c in i], "dp_U": u, "dp_V": v}


def draw_person(img, box, labels):
    """Paint the figure into img (H, W, 3) at box (x, y, w, h); returns its image mask."""
    x, y, w, h = box
    H, W = img.shape[:2]
    mask = np.zeros((H, W), dtype=bool)
    ys, xs = np.mgrid[int(y):int(y + h), int(x):int(x + w)]
    fx = np.clip(((xs + 0.5 - x) / w * 256).astype(int), 0, 255)
    fy = np.clip(((ys + 0.5 - y) / h * 256).astype(int), 0, 255)
    part = labels[fy, fx]
    on = part > 0
    img[ys[on], xs[on], 0] = [part_red(p) for p in part[on]]
    img[ys[on], xs[on], 1] = (60 + 180 * (fx[on] % 64) / 64).astype(np.uint8)
    img[ys[on], xs[on], 2] = (60 + 180 * (fy[on] % 64) / 64).astype(np.uint8)
    mask[ys[on], xs[on]] = True
    return mask


def _rle(mask):
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_split(root, split, seed=0, image_size=IMAGE_SIZE):
    folder, n_images, first_id = SPLITS[split]
    rng = np.random.default_rng(seed + first_id)
    labels = figure_labels()
    dp = dict(figure_points(), dp_masks=encode_part_masks(labels))
    img_dir = os.path.join(root, "coco", folder)
    os.makedirs(img_dir, exist_ok=True)
    W, H = image_size
    images, annotations = [], []
    for k in range(n_images):
        image_id = first_id + k + 1
        name = f"COCO_{folder}_{image_id:012d}.jpg"
        img = rng.integers(0, 20, (H, W, 3)).astype(np.uint8)
        n_people = 2 + (k % 2)
        slots = np.linspace(0, W, n_people + 1)
        for p in range(n_people):
            w = float(rng.integers(60, min(140, int(slots[1] - slots[0]))))
            h = float(min(H - 4, int(w * rng.uniform(1.3, 1.8))))
            x = float(rng.integers(int(slots[p]), int(slots[p + 1] - w) + 1))
            y = float(rng.integers(0, int(H - h) + 1))
            mask = draw_person(img, (x, y, w, h), labels)
            anno = {"id": image_id * 10 + p, "image_id": image_id, "category_id": 1,
                    "iscrowd": 0, "bbox": [x, y, w, h], "area": float(mask.sum()),
                    "segmentation": _rle(mask)}
            if p < 2:  # the third person of odd images has no DensePose annotation
                anno.update(dp)
            annotations.append(anno)
        Image.fromarray(img).save(os.path.join(img_dir, name), quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
    data = {"info": {"description": "synthetic DensePose-COCO fixture (moco-transfer)"},
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}
    path = os.path.join(root, "coco", "annotations", f"densepose_{split}2014.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)
    return path


def write_uv_symmetries(path):
    """Mirror tables of the figure: every chart maps to its partner at U' = 1 - U, V' = V."""
    from scipy.io import savemat

    idx = np.arange(256) / 255.0
    u = np.tile(1 - idx[None, :], (256, 1)).astype(np.float32)
    v = np.tile(idx[:, None], (1, 256)).astype(np.float32)
    cells_u = np.empty((1, N_CHARTS), dtype=object)
    cells_v = np.empty((1, N_CHARTS), dtype=object)
    for c in range(N_CHARTS):
        cells_u[0, c], cells_v[0, c] = u, v
    savemat(path, {"U_transforms": cells_u, "V_transforms": cells_v})


def write_fixture(root, seed=0, surface_steps=5, image_size=IMAGE_SIZE):
    for split in SPLITS:
        write_split(root, split, seed, image_size)
    data = os.path.join(root, "densepose")
    os.makedirs(data, exist_ok=True)
    write_uv_symmetries(os.path.join(data, "UV_symmetry_transforms.mat"))
    gps.write_official_surface(data, *gps.grid_surface(surface_steps))
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(write_fixture(sys.argv[1]))
