"""Archives with the official names and internal layouts, generated small, for `make data`'s
tests; and a recipe override (tools/data/recipes.json's schema) that points at them.

Contents come from the shared real samples (VOC, COCO, LVIS, ImageNet images) and the project's
fixture writers (tools/fixtures: SBD-style labels, Cityscapes, DensePose), packed the way the
official archives are:
    VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar   VOCdevkit/VOC2007/...
    VOCtrainval_11-May-2012.tar                            VOCdevkit/VOC2012/... (+ SegmentationClass)
    benchmark.tgz                                          benchmark_RELEASE/dataset/{cls/*.mat,img,train.txt,val.txt}
    annotations_trainval2017.zip, train2017.zip, val2017.zip, train2014.zip, val2014.zip
    lvis_v0.5_{train,val}.json.zip, lvis_v1_{train,val}.json.zip
    densepose_*2014.json and the DensePose data files
    gtFine_trainvaltest.zip, leftImg8bit_trainvaltest.zip  gtFine/<split>/<city>/..., leftImg8bit/...
    ILSVRC2012_img_train.tar (<wnid>.tar inside), ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz
"""
import copy
import hashlib
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import scipy.io
from PIL import Image

from tools.data.recipes import load_recipes
from tools.fixtures.cityscapes_voc import write_cityscapes, write_voc_aug
from tools.fixtures.densepose import write_fixture as write_densepose
from tools.sample_data import layout

VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def _tar(path, entries, mode="w"):
    """entries: {arcname: bytes}"""
    with tarfile.open(path, mode) as tf:
        for name, data in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted(entries.items()):
            zf.writestr(name, data)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _png(array, palette=None):
    im = Image.fromarray(array.astype(np.uint8), mode="L" if palette is None else "P")
    if palette is not None:
        im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _mat(obj):
    buf = io.BytesIO()
    scipy.io.savemat(buf, obj)
    return buf.getvalue()


# ---------------------------------------------------------------- VOC + SBD
def voc_archives(shared, out, work):
    """The three VOC tars and SBD's benchmark.tgz; returns what a correct build yields."""
    sample = layout(shared, os.path.join(work, "sample"))
    voc = os.path.join(sample, "VOC2012")
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(voc, "Annotations")))
    ids = ids[:12]
    # class-index labels drawn from the sample's boxes by the project's fixture writer
    for split, sel in (("trainval", ids[:8]), ("test", ids[8:12])):
        with open(os.path.join(voc, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("\n".join(sel) + "\n")
    write_voc_aug(sample, n_train=8, n_val=4)
    labels = {i: np.asarray(Image.open(os.path.join(voc, "SegmentationClassAug", i + ".png")))
              for i in ids}

    def files(year, sel, main_split):
        d = f"VOCdevkit/VOC{year}/"
        entries = {d + f"ImageSets/Main/{main_split}.txt": ("\n".join(sel) + "\n").encode()}
        for i in sel:
            entries[d + f"JPEGImages/{i}.jpg"] = _read(os.path.join(voc, "JPEGImages", i + ".jpg"))
            entries[d + f"Annotations/{i}.xml"] = _read(os.path.join(voc, "Annotations", i + ".xml"))
        return entries

    _tar(os.path.join(out, "VOCtrainval_06-Nov-2007.tar"), files(2007, ids[:3], "trainval"))
    _tar(os.path.join(out, "VOCtest_06-Nov-2007.tar"), files(2007, ids[3:5], "test"))
    voc_train, voc_val = ids[0:2], ids[2:4]
    entries = files(2012, ids, "trainval")
    for name, sel in (("train", voc_train), ("val", voc_val), ("trainval", voc_train + voc_val)):
        entries[f"VOCdevkit/VOC2012/ImageSets/Segmentation/{name}.txt"] = \
            ("\n".join(sel) + "\n").encode()
    for i in voc_train + voc_val:   # VOC's own labels: palette PNGs with 255 borders
        entries[f"VOCdevkit/VOC2012/SegmentationClass/{i}.png"] = _png(labels[i], VOC_PALETTE)
    _tar(os.path.join(out, "VOCtrainval_11-May-2012.tar"), entries)
    # SBD: its train and val overlap VOC 2012 seg train (ids[1]) and val (ids[3])
    sbd_train, sbd_val = ids[1:2] + ids[4:8], ids[3:4] + ids[8:11]
    sbd = {}
    for i in sorted(set(sbd_train + sbd_val)):
        seg = np.where(labels[i] == 255, 0, labels[i]).astype(np.uint8)   # SBD: no border
        bnd = np.zeros(seg.shape, dtype=object)
        sbd[f"benchmark_RELEASE/dataset/cls/{i}.mat"] = _mat({"GTcls": {
            "Segmentation": seg, "Boundaries": bnd.reshape(-1, 1)[:1],
            "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)}})
        sbd[f"benchmark_RELEASE/dataset/img/{i}.jpg"] = _read(
            os.path.join(voc, "JPEGImages", i + ".jpg"))
    sbd["benchmark_RELEASE/dataset/train.txt"] = ("\n".join(sbd_train) + "\n").encode()
    sbd["benchmark_RELEASE/dataset/val.txt"] = ("\n".join(sbd_val) + "\n").encode()
    _tar(os.path.join(out, "benchmark.tgz"), sbd, mode="w:gz")
    train_aug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
    expected = {i: labels[i] if i in voc_train + voc_val else
                np.where(labels[i] == 255, 0, labels[i]) for i in train_aug + voc_val}
    return {"train_aug": train_aug, "val": voc_val, "labels": expected,
            "counts": {
                "voc2007": {"VOC2007 trainval images": 3, "VOC2007 test images": 2},
                "voc2012": {"VOC2012 trainval images": 12,
                            "VOC2012 segmentation train images": 2,
                            "VOC2012 segmentation val images": 2},
                "voc_sbd": {"train_aug images": len(train_aug), "val images": 2}}}


# ---------------------------------------------------------------- COCO, LVIS
def coco_archives(shared, out, n_train=3, n_val=2):
    coco = os.path.join(shared, "coco_tiny")
    lvis = json.load(open(os.path.join(shared, "lvis_tiny", "annotations",
                                       "lvis_v0.5_val_present_images_only.json")))
    lvis_images = os.listdir(os.path.join(shared, "lvis_tiny", "val2017"))
    ann_entries, counts, keep = {}, {}, {}
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        kp = json.load(open(os.path.join(coco, "annotations", f"person_keypoints_{split}.json")))
        with_kp = sorted({a["image_id"] for a in kp["annotations"] if a.get("num_keypoints")})
        keep[split] = set(with_kp[:n])
        for kind in ("instances", "person_keypoints"):
            data = json.load(open(os.path.join(coco, "annotations", f"{kind}_{split}.json")))
            data["images"] = [im for im in data["images"] if im["id"] in keep[split]]
            data["annotations"] = [a for a in data["annotations"]
                                   if a["image_id"] in keep[split]]
            ann_entries[f"annotations/{kind}_{split}.json"] = json.dumps(data).encode()
            counts[f"{kind}_{split} images"] = len(data["images"])
            counts[f"{kind}_{split} annotations"] = len(data["annotations"])
        names = [im["file_name"] for im in data["images"]]
        entries = {f"{split}/{n}": _read(os.path.join(coco, split, n)) for n in names}
        if split == "val2017":   # LVIS's one present image is a COCO val2017 image
            for n in lvis_images:
                entries[f"{split}/{n}"] = _read(os.path.join(shared, "lvis_tiny", "val2017", n))
        entries[f"{split}/"] = b""   # (a folder entry, as the official zips have)
        _zip(os.path.join(out, f"{split}.zip"), {k: v for k, v in entries.items()
                                                  if not k.endswith("/")})
        counts[f"{split} files"] = len([k for k in entries if not k.endswith("/")])
    ann_entries["annotations/captions_val2017.json"] = b"{}"   # present in the official zip
    _zip(os.path.join(out, "annotations_trainval2017.zip"), ann_entries)
    lvis_counts = {}
    for version in ("v0.5", "v1"):
        for split in ("train", "val"):
            name = f"lvis_{version}_{split}.json"
            _zip(os.path.join(out, name + ".zip"), {name: json.dumps(lvis).encode()})
            lvis_counts[f"lvis_{version}_{split} images"] = len(lvis["images"])
            lvis_counts[f"lvis_{version}_{split} annotations"] = len(lvis["annotations"])
    return {"coco": counts, "lvis": lvis_counts}


# ---------------------------------------------------------------- DensePose + COCO 2014
DENSEPOSE_FILES = ("densepose_train2014.json", "densepose_valminusminival2014.json",
                   "densepose_minival2014.json", "UV_symmetry_transforms.mat", "SMPL_subdiv.mat",
                   "SMPL_SUBDIV_TRANSFORM.mat", "Pdist_matrix.pkl")


def densepose_archives(out, work):
    root = os.path.join(work, "densepose")
    write_densepose(root)
    for split in ("train2014", "val2014"):
        folder = os.path.join(root, "coco", split)
        _zip(os.path.join(out, f"{split}.zip"),
             {f"{split}/{n}": _read(os.path.join(folder, n)) for n in os.listdir(folder)})
    counts = {}
    for name in DENSEPOSE_FILES:
        src = os.path.join(root, "coco", "annotations", name) if name.endswith(".json") else \
            os.path.join(root, "densepose", name)
        with open(os.path.join(out, name), "wb") as f:
            f.write(_read(src))
        if name.endswith(".json"):
            data = json.load(open(src))
            counts[f"{name[:-5]} images"] = len(data["images"])
            counts[f"{name[:-5]} annotations"] = len(data["annotations"])
    return {"densepose": counts, "coco2014": {
        f"{s} files": len(os.listdir(os.path.join(root, "coco", s)))
        for s in ("train2014", "val2014")}, "root": root}


# ---------------------------------------------------------------- Cityscapes
def cityscapes_archives(out, work):
    """The two zips; returns the fixture root with the train-id images to compare against."""
    root = os.path.join(work, "cityscapes_fixture")
    write_cityscapes(root, split_cities=(("train", "aachen", 2), ("val", "frankfurt", 1),
                                         ("test", "berlin", 1)))
    base = os.path.join(root, "cityscapes")
    gt, img = {"license.txt": b"fixture", "README": b"fixture"}, {"license.txt": b"fixture"}
    for d, _, fs in os.walk(base):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), base)
            if f.endswith("_labelTrainIds.png"):
                continue   # not in the official zip: cityscapesscripts makes them
            (gt if rel.startswith("gtFine") else img)[rel] = _read(os.path.join(d, f))
    _zip(os.path.join(out, "gtFine_trainvaltest.zip"), gt)
    _zip(os.path.join(out, "leftImg8bit_trainvaltest.zip"), img)
    return {"root": base, "counts": {"train images": 2, "val images": 1, "test images": 1,
                                     "train polygons": 2, "val polygons": 1,
                                     "train trainId labels": 2, "val trainId labels": 1}}


# ---------------------------------------------------------------- ImageNet
def imagenet_archives(shared, out, n_classes=3, per_class=2):
    src = os.path.join(shared, "imagenet_sample", "train")
    wnids = sorted(os.listdir(src))[:n_classes]
    images = {w: _read(os.path.join(src, w, sorted(os.listdir(os.path.join(src, w)))[0]))
              for w in wnids}
    outer = {}
    for w in wnids:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for k in range(per_class):
                info = tarfile.TarInfo(f"{w}_{k}.JPEG")
                info.size = len(images[w])
                tf.addfile(info, io.BytesIO(images[w]))
        outer[f"{w}.tar"] = buf.getvalue()
    _tar(os.path.join(out, "ILSVRC2012_img_train.tar"), outer)
    # val image k has class ids[k % n]; the devkit's IDs are not in wnid order (as the real one)
    ilsvrc_id = {w: 3 + i * 2 for i, w in enumerate(wnids)}
    val_classes = [wnids[(k * 2) % n_classes] for k in range(n_classes * per_class)]
    _tar(os.path.join(out, "ILSVRC2012_img_val.tar"),
         {f"ILSVRC2012_val_{k + 1:08d}.JPEG": images[w] for k, w in enumerate(val_classes)})
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = [(ilsvrc_id[w], w, "a class", 0) for w in wnids] + \
        [(1001, "n00000001", "a parent synset", 3)]
    meta = np.array(synsets, dtype=dtype).reshape(-1, 1)
    _tar(os.path.join(out, "ILSVRC2012_devkit_t12.tar.gz"), {
        "ILSVRC2012_devkit_t12/data/meta.mat": _mat({"synsets": meta}),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
            "".join(f"{ilsvrc_id[w]}\n" for w in val_classes).encode(),
        "ILSVRC2012_devkit_t12/readme.txt": b"fixture"}, mode="w:gz")
    return {"val_classes": val_classes, "counts": {
        "train images": n_classes * per_class, "train classes": n_classes,
        "val images": n_classes * per_class, "val classes": len(set(val_classes))}}


# ---------------------------------------------------------------- everything + the override
def write_all(shared, out, work):
    """Every archive into ``out``; returns {dataset: expected counts} and the details."""
    os.makedirs(out, exist_ok=True)
    details = {"voc": voc_archives(shared, out, work),
               "coco": coco_archives(shared, out),
               "densepose": densepose_archives(out, work),
               "cityscapes": cityscapes_archives(out, work),
               "imagenet": imagenet_archives(shared, out)}
    counts = dict(details["voc"]["counts"])
    counts["coco"] = details["coco"]["coco"]
    counts["coco2014"] = details["densepose"]["coco2014"]
    counts["densepose"] = details["densepose"]["densepose"]
    for v in ("v0.5", "v1"):
        counts[f"lvis_{v}"] = {k: n for k, n in details["coco"]["lvis"].items()
                               if k.startswith(f"lvis_{v}_")}
    counts["cityscapes"] = details["cityscapes"]["counts"]
    counts["imagenet"] = details["imagenet"]["counts"]
    return counts, details


def md5_of(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def override(archives, base_url, counts, site=None):
    """The real recipes with the generated archives' URLs, md5s and counts (published md5s
    where the real recipe has one, so that both kinds of checksum are exercised)."""
    recipes = load_recipes()
    out = {"datasets": {}}
    for name, recipe in recipes["datasets"].items():
        r = copy.deepcopy(recipe)
        for f in r["files"]:
            f["urls"] = [] if name in ("cityscapes", "imagenet") else \
                [f"{base_url}/{f['filename']}"]
            if "md5" in f:
                f["md5"] = md5_of(os.path.join(archives, f["filename"]))
                f["checksum_source"] = "generated by tests/data_archives.py"
        if site and "login" in r:
            r["login"]["site"] = site
        r["counts"] = counts[name]
        out["datasets"][name] = r
    return out
