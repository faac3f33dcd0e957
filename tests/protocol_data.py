"""A dataset root for the full-protocol tier: every task's datasets, official formats, real sizes.

Real samples (../shared/data) where they exist, cut to one or two images per split so that one
training iteration and one evaluation at the protocol's sizes stay affordable on a CPU:
COCO 2017 (instances + person keypoints, 640x480-class images), VOC 2007/2012 (VOC images,
about 500x375), LVIS v0.5 (its one present image, used for train and val). Generated fixtures
where no sample exists, at the sizes of the real datasets: Cityscapes fine (2048x1024, with
polygons, instance ids, label ids and train ids), VOC 2012 SegmentationClassAug labels on the
real VOC images, DensePose-COCO (640x480 images), and the demo's synthetic shapes.
"""
import json
import os

from pretrain import synthetic
from tests.fixtures import write_cityscapes, write_voc_aug
from transfer.densepose.fixture import write_fixture as write_densepose
from transfer.sample_data import layout

COCO_SPLITS = ("train2017", "val2017")


def _subset_coco(annotations_dir, n_images):
    """Keep, in both instances_* and person_keypoints_*, the first n images that have a person
    with visible keypoints (so the keypoint task keeps them) and instances."""
    for split in COCO_SPLITS:
        kp_path = os.path.join(annotations_dir, f"person_keypoints_{split}.json")
        with open(kp_path) as f:
            kp = json.load(f)
        with_kp = [a["image_id"] for a in kp["annotations"] if a.get("num_keypoints", 0) > 0]
        keep = set(sorted(set(with_kp))[:n_images])
        for name in (f"instances_{split}.json", f"person_keypoints_{split}.json"):
            path = os.path.join(annotations_dir, name)
            with open(path) as f:
                data = json.load(f)
            data["images"] = [im for im in data["images"] if im["id"] in keep]
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
            os.remove(path)  # a symbolic link into ../shared: replaced, never written through
            with open(path, "w") as f:
                json.dump(data, f)


def _keep_first_images(path, n):
    """A COCO-style json cut to its first n images and their annotations."""
    with open(path) as f:
        data = json.load(f)
    keep = {im["id"] for im in data["images"][:n]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    with open(path, "w") as f:
        json.dump(data, f)


def _subset_voc(root, n_train, n_test):
    # detectron2 v0.6 reads the id lists with np.loadtxt, which gives a 0-d array (not
    # iterable) for a one-line file: VOC splits keep at least two images
    n_train, n_test = max(n_train, 2), max(n_test, 2)
    for year in ("2007", "2012"):
        main = os.path.join(root, f"VOC{year}", "ImageSets", "Main")
        for name, n in (("trainval", n_train), ("train", n_train), ("test", n_test),
                        ("val", n_test)):
            path = os.path.join(main, name + ".txt")
            with open(path) as f:
                ids = [line.strip() for line in f if line.strip()]
            with open(path, "w") as f:
                f.write("\n".join(ids[:n]) + "\n")


def write_protocol_datasets(shared_data, root, n_train=2, n_test=1):
    layout(shared_data, root)
    _subset_coco(os.path.join(root, "coco", "annotations"), n_train)
    # the test split keeps n_test of the kept val images
    for name in ("instances_val2017.json", "person_keypoints_val2017.json"):
        _keep_first_images(os.path.join(root, "coco", "annotations", name), n_test)
    _subset_voc(root, n_train, n_test)
    lvis_val = os.path.join(root, "lvis", "lvis_v0.5_val.json")
    os.symlink(os.path.realpath(lvis_val), os.path.join(root, "lvis", "lvis_v0.5_train.json"))
    write_voc_aug(root, n_train=n_train, n_val=n_test)
    write_cityscapes(root, split_cities=(("train", "aachen", n_train),
                                         ("val", "frankfurt", n_test)), size=(2048, 1024))
    write_densepose(root, image_size=(640, 480))
    _keep_first_images(os.path.join(root, "coco", "annotations", "densepose_minival2014.json"),
                       n_test)
    synthetic.generate(os.path.join(root, "synthetic"), n_unlabeled=0, n_labeled_per_class=0,
                       n_train=n_train, n_val=n_test, quiet=True)
    return root
