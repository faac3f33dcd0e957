"""Counting a built dataset once: images and annotations per split, every listed image present.

A registry of counters, named by the recipes' ``count`` key. Each returns {label: number}; the
build compares the numbers with the recipe's official counts and records them in the manifest.
"""
import json
import os

from convert.errors import UserError

COUNTERS = {}


def register_counter(name):
    def deco(fn):
        COUNTERS[name] = fn
        return fn
    return deco


def _ids(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _require(paths, what):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} {what} missing, e.g. {missing[0]}")


@register_counter("voc_main")
def count_voc_main(root, options):
    d = os.path.join(root, options["dir"])
    out = {}
    for split in options["splits"]:
        ids = _ids(os.path.join(d, "ImageSets", "Main", split + ".txt"))
        _require([os.path.join(d, "JPEGImages", i + ".jpg") for i in ids], "VOC images")
        _require([os.path.join(d, "Annotations", i + ".xml") for i in ids], "VOC annotations")
        out[f"{options['dir']} {split} images"] = len(ids)
    for split in options.get("segmentation", []):
        ids = _ids(os.path.join(d, "ImageSets", "Segmentation", split + ".txt"))
        _require([os.path.join(d, "SegmentationClass", i + ".png") for i in ids],
                 "VOC segmentation labels")
        out[f"{options['dir']} segmentation {split} images"] = len(ids)
    return out


@register_counter("voc_seg")
def count_voc_seg(root, options):
    d = os.path.join(root, options["dir"])
    out = {}
    for split in options["splits"]:
        ids = _ids(os.path.join(d, "ImageSets", "Segmentation", split + ".txt"))
        _require([os.path.join(d, "JPEGImages", i + ".jpg") for i in ids], "VOC images")
        _require([os.path.join(d, "SegmentationClassAug", i + ".png") for i in ids],
                 "SegmentationClassAug labels")
        out[f"{split} images"] = len(ids)
    return out


def _files(folder):
    return {e.name for e in os.scandir(folder) if e.is_file()} if os.path.isdir(folder) else set()


@register_counter("coco_json")
def count_coco_json(root, options):
    out = {}
    listed = {}
    for label, folder in options.get("folders", {}).items():
        out[label] = len(_files(os.path.join(root, folder)))
    for label, (path, image_dir) in options.get("json", {}).items():
        full = os.path.join(root, path)
        try:
            with open(full) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{full} is not readable JSON ({e})") from None
        out[f"{label} images"] = len(data.get("images", []))
        out[f"{label} annotations"] = len(data.get("annotations", []))
        if image_dir:
            if image_dir not in listed:
                listed[image_dir] = _files(os.path.join(root, image_dir))
            absent = [im["file_name"] for im in data.get("images", [])
                      if os.path.basename(im["file_name"]) not in listed[image_dir]]
            if absent:
                raise UserError(f"{len(absent)} images of {full} are not in "
                                f"{os.path.join(root, image_dir)}, e.g. {absent[0]}")
    return out


@register_counter("cityscapes")
def count_cityscapes(root, options):
    d = os.path.join(root, options["dir"])
    out = {}
    for split in options["splits"]:
        def n(kind, suffix):
            folder = os.path.join(d, kind, split)
            return sum(f.endswith(suffix) for _, _, fs in os.walk(folder) for f in fs)
        out[f"{split} images"] = n("leftImg8bit", "_leftImg8bit.png")
        if split != "test":   # the test split's labels are placeholders
            out[f"{split} polygons"] = n("gtFine", "_gtFine_polygons.json")
            out[f"{split} trainId labels"] = n("gtFine", "_gtFine_labelTrainIds.png")
    return out


@register_counter("imagenet")
def count_imagenet(root, options):
    d = os.path.join(root, options["dir"])
    out = {}
    for split in options["splits"]:
        folder = os.path.join(d, split)
        classes = [e.path for e in os.scandir(folder) if e.is_dir()] if os.path.isdir(folder) \
            else []
        out[f"{split} images"] = sum(len(_files(c)) for c in classes)
        out[f"{split} classes"] = len(classes)
    return out


def check(counts, official, name):
    """UserError naming every count that differs from its official number (None: recorded)."""
    wrong = [f"{k}: {counts.get(k)} (official {v})" for k, v in official.items()
             if v is not None and counts.get(k) != v]
    if wrong:
        raise UserError(f"{name} does not have the official counts: {'; '.join(wrong)}; the "
                        "archives or their extraction are incomplete (delete the dataset's "
                        "folders and run `make data` again)")
