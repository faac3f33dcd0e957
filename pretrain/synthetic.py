"""The embedded default dataset: textured scenes of shapes, generated on demand, in real formats.

Deterministic from a seed and cached (a second call with the same parameters reuses the files).
Everything is synthetic and labelled so. Written under ``root``:

    unlabeled/               object-centric images (one large object each, like ImageNet's
                             photos) for MoCo pretraining (flat folder), half the scene size
    labeled/<class>/         the same kind of images, labelled, for the supervised baseline and
                             kNN/linear eval
    coco/annotations/instances_{train,val}.json   boxes, polygon masks; keypoints for 'square'
    coco/{train,val}/        the scene images
    VOCdevkit/VOC2007/       Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{trainval,test}.txt
"""
import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["disc", "square", "triangle", "star"]
KEYPOINT_CLASS = "square"
KEYPOINT_NAMES = ["top_left", "top_right", "bottom_right", "bottom_left"]
KEYPOINT_FLIP_MAP = [("top_left", "top_right"), ("bottom_left", "bottom_right")]
VERSION = 4  # bump when the generator changes: invalidates caches
# Each class has its own shape and its own fill pattern, at the class's own scale and
# orientation (the object's size, position, rotation and colours are drawn per object). With the
# pattern's orientation and scale drawn per object (VERSION 3), instance discrimination told
# images apart by them, and the features it learnt sorted the classes worse than a random
# network's (kNN, README's "what varies").
PATTERNS = {"disc": "stripes", "square": "checker", "triangle": "dots", "star": "rings"}
PATTERN_PERIOD, PATTERN_ANGLE = 1.5, 0.3  # pixels per radian of the pattern's phase; radians
# Backgrounds are low-contrast (the texture blended into grey) and objects are dark/light with a
# slight tint: what tells two images apart is then mostly their object's shape and pattern, not
# colour, so contrastive pretraining (MoCo's instance discrimination) has to learn those.
BACKGROUND_CONTRAST = 0.2


def _texture(rng, h, w, scale):
    """Smooth colour noise: low-resolution random field, bicubically upsampled."""
    lo = rng.random((max(2, h // scale), max(2, w // scale), 3)) * 255
    img = Image.fromarray(lo.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return img


def _polygon(cls, cx, cy, r, angle):
    if cls == "disc":
        n, radii = 24, [r] * 24
    elif cls == "square":
        n, radii = 4, [r * math.sqrt(2)] * 4
        angle = angle * 0.15 + math.pi / 4  # nearly axis-aligned, corners = keypoints
    elif cls == "triangle":
        n, radii = 3, [r * 1.2] * 3
    else:  # star
        n, radii = 10, [r * 1.2 if i % 2 == 0 else r * 0.5 for i in range(10)]
    return [(cx + radii[i] * math.cos(angle + 2 * math.pi * i / n),
             cy + radii[i] * math.sin(angle + 2 * math.pi * i / n)) for i in range(n)]


def _pattern(kind, xx, yy, cx, cy, period, theta):
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    if kind == "stripes":
        return np.sin(u / period) > 0
    if kind == "checker":
        return (np.sin(u / period) > 0) ^ (np.sin(v / period) > 0)
    if kind == "dots":
        return np.cos(u / period) * np.cos(v / period) > 0.4
    return np.sin(np.hypot(u, v) / period) > 0  # rings


def _paint_object(img, rng, cls, poly):
    """Fill the polygon with its class's pattern, in two random colours."""
    w, h = img.size
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    tint = rng.integers(-20, 21, 3)
    c1 = np.clip(rng.integers(0, 90) + tint, 0, 255)
    c2 = np.clip(rng.integers(166, 256) + tint, 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = sum(p[0] for p in poly) / len(poly), sum(p[1] for p in poly) / len(poly)
    on = _pattern(PATTERNS[cls], xx, yy, cx, cy, PATTERN_PERIOD, PATTERN_ANGLE)
    fill = np.where(on[..., None], c1, c2).astype(np.uint8)
    img.paste(Image.fromarray(fill), (0, 0), mask)
    return mask


def _background(rng, size):
    grey = int(rng.integers(90, 166))
    return Image.blend(Image.new("RGB", (size, size), (grey, grey, grey)),
                       _texture(rng, size, size, scale=int(rng.integers(8, 32))),
                       BACKGROUND_CONTRAST)


def make_object_image(rng, size, cls=None):
    """One object, centred and large (object-centric, like ImageNet's photos)."""
    cls = cls or CLASSES[int(rng.integers(len(CLASSES)))]
    img = _background(rng, size)
    r = rng.uniform(size * 0.2, size * 0.34)
    cx, cy = size / 2 + rng.uniform(-size / 16, size / 16, 2)
    _paint_object(img, rng, cls, _polygon(cls, cx, cy, r, rng.uniform(0, 2 * math.pi)))
    return img.filter(ImageFilter.GaussianBlur(radius=0.6))


def make_scene(rng, size, max_objects=4):
    img = _background(rng, size)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        r = rng.uniform(size * 0.08, size * 0.2)
        cx, cy = rng.uniform(r * 1.3, size - r * 1.3, 2)
        poly = _polygon(cls, cx, cy, r, rng.uniform(0, 2 * math.pi))
        _paint_object(img, rng, cls, poly)
        objects.append((cls, poly))
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    return img, objects


def _bbox(poly, size):
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(size), max(xs)), min(float(size), max(ys))
    return [x0, y0, x1 - x0, y1 - y0]


def _coco_split(rng, out_dir, split, n, size, ann_id):
    images, anns = [], []
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    for i in range(n):
        img, objects = make_scene(rng, size)
        image_id = len(images) + 1
        fname = f"{split}_{image_id:05d}.jpg"
        img.save(os.path.join(out_dir, split, fname), quality=95)
        images.append({"id": image_id, "file_name": fname, "width": size, "height": size})
        for cls, poly in objects:
            ann_id += 1
            box = _bbox(poly, size)
            ann = {"id": ann_id, "image_id": image_id, "category_id": CLASSES.index(cls) + 1,
                   "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                   "segmentation": [[round(c, 2) for p in poly for c in p]]}
            if cls == KEYPOINT_CLASS:
                kps = []
                # corners ordered tl, tr, br, bl by angle around the centre
                cx, cy = sum(p[0] for p in poly) / 4, sum(p[1] for p in poly) / 4
                order = sorted(poly, key=lambda p: math.atan2(p[1] - cy, p[0] - cx))
                # atan2 order from -pi: top-left (-3pi/4), top-right (-pi/4), br, bl
                for x, y in order:
                    inside = 0 <= x < size and 0 <= y < size
                    kps += [round(x, 2), round(y, 2), 2 if inside else 0]
                ann["keypoints"] = kps
                ann["num_keypoints"] = sum(1 for v in kps[2::3] if v > 0)
            anns.append(ann)
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    categories[CLASSES.index(KEYPOINT_CLASS)].update(keypoints=KEYPOINT_NAMES,
                                                     skeleton=[[1, 2], [2, 3], [3, 4], [4, 1]])
    data = {"info": {"description": "moco-transfer synthetic shapes (generated, not real data)",
                     "version": VERSION},
            "licenses": [], "images": images, "annotations": anns, "categories": categories}
    path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return data, ann_id


def _write_voc(voc_root, coco_dir, split_data):
    """Write the COCO scenes again in PASCAL VOC layout (xml boxes, ImageSets lists)."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc_root, sub), exist_ok=True)
    for voc_split, (coco_split, data) in split_data.items():
        ids = []
        by_image = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in data["images"]:
            stem = os.path.splitext(im["file_name"])[0]
            ids.append(stem)
            src = os.path.join(coco_dir, coco_split, im["file_name"])
            dst = os.path.join(voc_root, "JPEGImages", stem + ".jpg")
            if not os.path.exists(dst):
                shutil.copyfile(src, dst)
            objs = []
            for a in by_image.get(im["id"], []):
                x, y, w, h = a["bbox"]
                objs.append(
                    f"  <object><name>{CLASSES[a['category_id'] - 1]}</name><pose>Unspecified"
                    f"</pose><truncated>0</truncated><difficult>0</difficult><bndbox>"
                    f"<xmin>{int(x) + 1}</xmin><ymin>{int(y) + 1}</ymin>"
                    f"<xmax>{int(x + w)}</xmax><ymax>{int(y + h)}</ymax></bndbox></object>")
            xml = (f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg</filename>"
                   f"<size><width>{im['width']}</width><height>{im['height']}</height>"
                   f"<depth>3</depth></size><segmented>0</segmented>\n" + "\n".join(objs)
                   + "\n</annotation>\n")
            with open(os.path.join(voc_root, "Annotations", stem + ".xml"), "w") as f:
                f.write(xml)
        with open(os.path.join(voc_root, "ImageSets", "Main", voc_split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")


# The sizes `make demo` needs (tools/demo.py): enough unlabelled scenes for MoCo, a low-data
# detection task (few labelled training scenes, as in the paper's VOC07-only table) and a
# validation split large enough for a stable AP.
DEFAULTS = dict(n_unlabeled=1024, n_labeled_per_class=64, n_train=32, n_val=96)


def generate(root, seed=0, n_unlabeled=DEFAULTS["n_unlabeled"],
             n_labeled_per_class=DEFAULTS["n_labeled_per_class"], n_train=DEFAULTS["n_train"],
             n_val=DEFAULTS["n_val"], size=128, quiet=False):
    """Generate (or reuse) the synthetic dataset under `root`; returns `root`."""
    params = dict(version=VERSION, seed=seed, n_unlabeled=n_unlabeled,
                  n_labeled_per_class=n_labeled_per_class, n_train=n_train, n_val=n_val,
                  size=size)
    stamp = os.path.join(root, "GENERATED.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == params:
                return root
        # other sizes: start over (stale scenes or COCO splits must not survive)
        for sub in ("unlabeled", "labeled", "coco", "VOCdevkit"):
            shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
        os.remove(stamp)
    if not quiet:
        print(f"[synthetic] generating the embedded dataset under {root} (seed {seed})")
    rng = np.random.default_rng(seed)
    unl = os.path.join(root, "unlabeled")
    os.makedirs(unl, exist_ok=True)
    for i in range(n_unlabeled):
        make_object_image(rng, size // 2).save(os.path.join(unl, f"{i:05d}.jpg"), quality=95)
    for cls in CLASSES:
        d = os.path.join(root, "labeled", cls)
        os.makedirs(d, exist_ok=True)
        for i in range(n_labeled_per_class):
            make_object_image(rng, size // 2, cls).save(os.path.join(d, f"{i:05d}.jpg"),
                                                        quality=95)
    coco_dir = os.path.join(root, "coco")
    train, ann_id = _coco_split(rng, coco_dir, "train", n_train, size, 0)
    val, _ = _coco_split(rng, coco_dir, "val", n_val, size, ann_id)
    _write_voc(os.path.join(root, "VOCdevkit", "VOC2007"), coco_dir,
               {"trainval": ("train", train), "test": ("val", val)})
    with open(stamp, "w") as f:
        json.dump(params, f)
    return root


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="generate the embedded synthetic dataset")
    p.add_argument("root", nargs="?", default="datasets/synthetic")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(generate(a.root, a.seed))
