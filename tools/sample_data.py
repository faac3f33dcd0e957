"""Lay the small real samples of ../shared/data out as a detectron2 dataset root.

    python -m tools.sample_data ../shared/data datasets_tiny
    DETECTRON2_DATASETS=datasets_tiny make transfer TASK=voc_frcnn_c4_24k SCALE=smoke

Only symbolic links and small list files are written. Result:
    coco/annotations/{instances,person_keypoints}_{train,val}2017.json, coco/{train,val}2017/
    VOC2007/, VOC2012/  (the 100 VOC2012 images; trainval = the sample's train half,
                         test = its val half, so training and test images never overlap)
    lvis/lvis_v0.5_val.json  (LVIS v0.5 val, filtered to the one image present)
`voc_objects` writes the VOC sample's objects as a labelled image folder (kNN monitors).
"""
import os
import sys


def _link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(os.path.abspath(src), dst)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def layout(shared_data, root):
    """Create the dataset root `root` from `shared_data` (../shared/data); returns root."""
    coco = os.path.join(shared_data, "coco_tiny")
    if not os.path.isdir(coco):
        raise FileNotFoundError(f"{coco} not found: expected ../shared/data/coco_tiny "
                                "(the project's shared samples)")
    for name in os.listdir(os.path.join(coco, "annotations")):
        _link(os.path.join(coco, "annotations", name),
              os.path.join(root, "coco", "annotations", name))
    _link(os.path.join(coco, "train2017"), os.path.join(root, "coco", "train2017"))
    val_dir = os.path.join(root, "coco", "val2017")
    os.makedirs(val_dir, exist_ok=True)
    for name in os.listdir(os.path.join(coco, "val2017")):
        _link(os.path.join(coco, "val2017", name), os.path.join(val_dir, name))
    lvis = os.path.join(shared_data, "lvis_tiny")
    for name in os.listdir(os.path.join(lvis, "val2017")):
        _link(os.path.join(lvis, "val2017", name), os.path.join(val_dir, name))
    _link(os.path.join(lvis, "annotations", "lvis_v0.5_val_present_images_only.json"),
          os.path.join(root, "lvis", "lvis_v0.5_val.json"))

    voc = os.path.join(shared_data, "voc_tiny", "VOCdevkit", "VOC2012")
    with open(os.path.join(voc, "ImageSets", "Main", "train.txt")) as f:
        train = f.read()
    with open(os.path.join(voc, "ImageSets", "Main", "val.txt")) as f:
        val = f.read()
    for year in ("2007", "2012"):
        d = os.path.join(root, f"VOC{year}")
        _link(os.path.join(voc, "Annotations"), os.path.join(d, "Annotations"))
        _link(os.path.join(voc, "JPEGImages"), os.path.join(d, "JPEGImages"))
        _write(os.path.join(d, "ImageSets", "Main", "trainval.txt"), train)
        _write(os.path.join(d, "ImageSets", "Main", "train.txt"), train)
        _write(os.path.join(d, "ImageSets", "Main", "test.txt"), val)
        _write(os.path.join(d, "ImageSets", "Main", "val.txt"), val)
    return root


def voc_objects(shared_data, out, min_side=32):
    """A labelled image folder `out/<class>/<image>_<k>.jpg` of the VOC sample's objects (not
    difficult, both sides >= `min_side` px): natural images with classes, for kNN monitors.
    Returns out."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    voc = os.path.join(shared_data, "voc_tiny", "VOCdevkit", "VOC2012")
    for name in sorted(os.listdir(os.path.join(voc, "Annotations"))):
        objects = ET.parse(os.path.join(voc, "Annotations", name)).findall("object")
        stem = os.path.splitext(name)[0]
        with Image.open(os.path.join(voc, "JPEGImages", stem + ".jpg")) as img:
            for k, obj in enumerate(objects):
                box = [float(obj.find("bndbox").findtext(t)) for t in
                       ("xmin", "ymin", "xmax", "ymax")]
                if obj.findtext("difficult") == "1" or min(box[2] - box[0],
                                                           box[3] - box[1]) < min_side:
                    continue
                path = os.path.join(out, obj.findtext("name"), f"{stem}_{k}.jpg")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                img.convert("RGB").crop(box).save(path, quality=95)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(layout(sys.argv[1], sys.argv[2]))
