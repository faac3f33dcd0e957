"""Generated fixtures in official file formats, for datasets with no real sample here.

Synthetic, small, labelled as such; the layouts and encodings are the official ones.
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw


def write_cityscapes(root, split_cities=(("train", "aachen", 3), ("val", "frankfurt", 2)),
                     size=(256, 128), seed=0, train_ids=True):
    """Cityscapes fine annotations under root/cityscapes:
    leftImg8bit/<split>/<city>/<city>_000000_<frame>_leftImg8bit.png and
    gtFine/<split>/<city>/<city>_000000_<frame>_gtFine_{polygons.json,instanceIds.png,
    labelIds.png,labelTrainIds.png,color.png}. Instance ids are labelId * 1000 + index (16-bit
    PNG), stuff pixels hold their labelId, as the official json2instanceImg writes them."""
    from cityscapesscripts.helpers.labels import name2label

    rng = np.random.default_rng(seed)
    w, h = size
    for split, city, n in split_cities:
        img_dir = os.path.join(root, "cityscapes", "leftImg8bit", split, city)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", split, city)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        for i in range(n):
            stem = f"{city}_000000_{i * 10 + 19:06d}"
            objects = [{"label": "road", "polygon": [[0, h // 2], [w - 1, h // 2], [w - 1, h - 1],
                                                      [0, h - 1]]},
                       {"label": "sky", "polygon": [[0, 0], [w - 1, 0], [w - 1, h // 4],
                                                     [0, h // 4]]}]
            for k in range(3):
                label = ["car", "person", "bicycle"][k]
                x0 = int(rng.integers(5, w - 70))
                y0 = int(rng.integers(h // 4, h - 50))
                bw, bh = int(rng.integers(25, 60)), int(rng.integers(20, 45))
                objects.append({"label": label, "polygon": [[x0, y0], [x0 + bw, y0],
                                                            [x0 + bw, y0 + bh], [x0, y0 + bh]]})
            label_ids = Image.new("L", (w, h), name2label["unlabeled"].id)
            train_ids_img = Image.new("L", (w, h), 255)
            inst_ids = Image.new("I", (w, h), name2label["unlabeled"].id)
            color = Image.new("RGB", (w, h), (0, 0, 0))
            counts = {}
            for obj in objects:
                lab = name2label[obj["label"]]
                poly = [tuple(p) for p in obj["polygon"]]
                ImageDraw.Draw(label_ids).polygon(poly, fill=lab.id)
                ImageDraw.Draw(train_ids_img).polygon(poly, fill=lab.trainId)
                ImageDraw.Draw(color).polygon(poly, fill=lab.color)
                if lab.hasInstances:
                    idx = counts.get(lab.id, 0)
                    counts[lab.id] = idx + 1
                    ImageDraw.Draw(inst_ids).polygon(poly, fill=lab.id * 1000 + idx)
                else:
                    ImageDraw.Draw(inst_ids).polygon(poly, fill=lab.id)
            photo = (rng.random((h, w, 3)) * 60).astype(np.uint8) + np.array(color)[..., :] // 2
            Image.fromarray(photo.astype(np.uint8)).save(
                os.path.join(img_dir, stem + "_leftImg8bit.png"))
            with open(os.path.join(gt_dir, stem + "_gtFine_polygons.json"), "w") as f:
                json.dump({"imgHeight": h, "imgWidth": w, "objects": objects}, f)
            label_ids.save(os.path.join(gt_dir, stem + "_gtFine_labelIds.png"))
            path = os.path.join(gt_dir, stem + "_gtFine_labelTrainIds.png")
            if train_ids:  # cityscapesscripts' createTrainIdLabelImgs output
                train_ids_img.save(path)
            elif os.path.exists(path):
                os.remove(path)
            color.save(os.path.join(gt_dir, stem + "_gtFine_color.png"))
            Image.fromarray(np.array(inst_ids).astype(np.uint16)).save(
                os.path.join(gt_dir, stem + "_gtFine_instanceIds.png"))
    return os.path.join(root, "cityscapes")


def write_voc_aug(dataset_root, n_train=12, n_val=6):
    """SBD-augmented VOC 2012 semantic labels in the standard layout, on the real VOC sample:
    VOC2012/SegmentationClassAug/<id>.png (class index per pixel, 255 on a 2-pixel object
    border, as VOC draws it) and VOC2012/ImageSets/Segmentation/{train_aug,val}.txt.
    Labels are drawn from the sample's boxes (generated, not SBD's masks)."""
    import xml.etree.ElementTree as ET

    from transfer.semseg import VOC_CLASSES

    voc = os.path.join(dataset_root, "VOC2012")
    with open(os.path.join(voc, "ImageSets", "Main", "trainval.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    with open(os.path.join(voc, "ImageSets", "Main", "test.txt")) as f:
        ids += [line.strip() for line in f if line.strip()]
    out = os.path.join(voc, "SegmentationClassAug")
    os.makedirs(out, exist_ok=True)
    os.makedirs(os.path.join(voc, "ImageSets", "Segmentation"), exist_ok=True)
    for i in ids[: n_train + n_val]:
        root = ET.parse(os.path.join(voc, "Annotations", i + ".xml")).getroot()
        w, h = int(root.find("size/width").text), int(root.find("size/height").text)
        label = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(label)
        for obj in root.findall("object"):
            b = obj.find("bndbox")
            box = [int(float(b.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax")]
            draw.rectangle(box, fill=VOC_CLASSES.index(obj.find("name").text), outline=255,
                           width=2)
        label.save(os.path.join(out, i + ".png"))
    for name, sel in (("train_aug", ids[:n_train]), ("val", ids[n_train:n_train + n_val])):
        with open(os.path.join(voc, "ImageSets", "Segmentation", name + ".txt"), "w") as f:
            f.write("\n".join(sel) + "\n")
    return voc
