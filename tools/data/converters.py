"""The conversions some datasets need after extraction, registered by the recipes' ``convert``
key. Each reads the staging folder (and the root, for a dataset it builds on) and writes its
outputs into the staging folder; the build then moves them into the root.
"""
import os
import tarfile

import numpy as np
import scipy.io
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image
from tqdm import tqdm

from convert.errors import UserError
from tools.data.extract import iter_tar, reading

CONVERTERS = {}


def register_converter(name):
    def deco(fn):
        CONVERTERS[name] = fn
        return fn
    return deco


def _ids(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------- VOC 2012 + SBD
def sbd_label(mat_path):
    """SBD's class label map: ``GTcls.Segmentation`` of its cls/<id>.mat (uint8, 0..20)."""
    try:
        gt = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation, dtype=np.uint8)
    except (OSError, KeyError, AttributeError, ValueError) as e:
        raise UserError(f"{mat_path} is not an SBD class label (.mat with a GTcls struct: "
                        f"{e})") from None


def train_aug_ids(sbd_train, sbd_val, voc_train, voc_val):
    """The 10582-image train_aug split: SBD train + SBD val + VOC 2012 seg train, minus VOC
    2012 seg val (the images VOC 2012 evaluates on never train)."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


@register_converter("sbd_to_aug")
def sbd_to_aug(staging, root, files, progress=True):
    """SegmentationClassAug/<id>.png (one class index per pixel, 8-bit grey) for train_aug and
    val, and train_aug.txt. An image VOC 2012 labels itself (SegmentationClass, with its 255
    borders) keeps VOC's label; the others take SBD's GTcls.Segmentation."""
    sbd = os.path.join(staging, "benchmark_RELEASE", "dataset")
    voc = os.path.join(root, "VOC2012")
    for path in (os.path.join(sbd, "cls"), os.path.join(sbd, "train.txt"),
                 os.path.join(voc, "ImageSets", "Segmentation", "val.txt")):
        if not os.path.exists(path):
            raise UserError(f"{path} is missing: benchmark.tgz (SBD) and VOC 2012 "
                            "(make data DATASET=voc2012) are needed")
    segsets = os.path.join(voc, "ImageSets", "Segmentation")
    voc_train, voc_val = _ids(os.path.join(segsets, "train.txt")), \
        _ids(os.path.join(segsets, "val.txt"))
    ids = train_aug_ids(_ids(os.path.join(sbd, "train.txt")), _ids(os.path.join(sbd, "val.txt")),
                        voc_train, voc_val)
    out = os.path.join(staging, "SegmentationClassAug")
    os.makedirs(out, exist_ok=True)
    for i in tqdm(ids + voc_val, desc="SegmentationClassAug", disable=not progress, leave=False):
        own = os.path.join(voc, "SegmentationClass", i + ".png")
        if os.path.isfile(own):
            with Image.open(own) as im:   # palette indices are the class ids
                label = np.asarray(im)
        else:
            label = sbd_label(os.path.join(sbd, "cls", i + ".mat"))
        Image.fromarray(label.astype(np.uint8), mode="L").save(os.path.join(out, i + ".png"))
    with open(os.path.join(staging, "train_aug.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


# ---------------------------------------------------------------- Cityscapes
@register_converter("cityscapes_train_ids")
def cityscapes_train_ids(staging, root, files, progress=True):
    """*_gtFine_labelTrainIds.png from every polygons json (cityscapesscripts' json2labelImg
    with the trainIds encoding, what its createTrainIdLabelImgs runs)."""
    gt = os.path.join(staging, "gtFine")
    jsons = sorted(os.path.join(d, f) for d, _, fs in os.walk(gt) for f in fs
                   if f.endswith("_gtFine_polygons.json"))
    if not jsons:
        raise UserError(f"no *_gtFine_polygons.json under {gt}: gtFine_trainvaltest.zip is not "
                        "the official archive")
    for path in tqdm(jsons, desc="labelTrainIds", disable=not progress, leave=False):
        json2labelImg(path, path.replace("_polygons.json", "_labelTrainIds.png"), "trainIds")


# ---------------------------------------------------------------- ImageNet
DEVKIT = "ILSVRC2012_devkit_t12/data/"


def imagenet_val_labels(devkit):
    """[wnid of val image 1, 2, ...] from the devkit: meta.mat maps ILSVRC2012_ID -> WNID,
    ILSVRC2012_validation_ground_truth.txt gives the ID of each val image in order."""
    meta = truth = None
    try:
        with tarfile.open(devkit) as tf:
            for member in tf:
                if member.name == DEVKIT + "meta.mat":
                    meta = scipy.io.loadmat(tf.extractfile(member), squeeze_me=True)["synsets"]
                elif member.name == DEVKIT + "ILSVRC2012_validation_ground_truth.txt":
                    truth = [int(x) for x in tf.extractfile(member).read().split()]
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as e:
        raise UserError(f"{devkit} is not the ILSVRC 2012 devkit ({e})") from None
    if meta is None or truth is None:
        raise UserError(f"{devkit} lacks {DEVKIT}meta.mat or its validation ground truth: not "
                        "the ILSVRC 2012 devkit (ILSVRC2012_devkit_t12.tar.gz)")
    wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta
            if int(s["num_children"]) == 0}
    return [wnid[i] for i in truth]


def _write(fileobj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(fileobj.read())


@register_converter("imagenet")
def imagenet(staging, root, files, progress=True):
    """imagenet/train/<wnid>/*.JPEG from the train tar (one tar per class inside) and
    imagenet/val/<wnid>/*.JPEG from the val tar and the devkit's labels."""
    labels = imagenet_val_labels(files["ILSVRC2012_devkit_t12.tar.gz"])
    train_tar = files["ILSVRC2012_img_train.tar"]
    with reading(train_tar):
        _imagenet_train(train_tar, staging, progress)
    val_tar = files["ILSVRC2012_img_val.tar"]
    with reading(val_tar):
        _imagenet_val(val_tar, labels, staging, progress)


def _imagenet_train(train_tar, staging, progress):
    for tf, member in iter_tar(train_tar, progress):
        wnid, ext = os.path.splitext(os.path.basename(member.name))
        if not member.isfile() or ext != ".tar":
            raise UserError(f"{train_tar} holds {member.name}, not a class tar (<wnid>.tar): "
                            "not the official ILSVRC2012_img_train.tar")
        with tarfile.open(fileobj=tf.extractfile(member), mode="r|") as inner:
            for image in inner:
                if image.isfile():
                    _write(inner.extractfile(image), os.path.join(
                        staging, "imagenet", "train", wnid, os.path.basename(image.name)))


def _imagenet_val(val_tar, labels, staging, progress):
    for tf, member in iter_tar(val_tar, progress):
        name = os.path.basename(member.name)
        try:
            index = int(name[len("ILSVRC2012_val_"):-len(".JPEG")])
            wnid = labels[index - 1]
        except (ValueError, IndexError):
            raise UserError(f"{val_tar} holds {member.name}, not ILSVRC2012_val_<n>.JPEG with "
                            "a label in the devkit: not the official ILSVRC2012_img_val.tar"
                            ) from None
        _write(tf.extractfile(member), os.path.join(staging, "imagenet", "val", wnid, name))
