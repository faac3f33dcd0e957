"""Datasets: detectron2's standard names under DETECTRON2_DATASETS, checked before training.

detectron2 registers its builtin datasets (coco_2017_*, keypoints_coco_2017_*, voc_20XX_*,
lvis_v0.5_*, lvis_v1_*, cityscapes_fine_*) with the root read from ``DETECTRON2_DATASETS``
(default ``./datasets``) when ``detectron2.data`` is first imported. This module adds the
embedded synthetic dataset, checks, per evaluator type, that the expected files exist (a missing
dataset stops before training with the folder and layout it expected), and keeps the registry
of dataset mappers. Semantic segmentation (semseg.py) and DensePose (densepose/data.py) register
their own datasets and mappers.
"""
import os

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from transfer.errors import UserError


class DatasetMissing(UserError, FileNotFoundError):
    """A dataset that is not where detectron2 looks for it (the message names the layout)."""


def dataset_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


LAYOUTS = {
    "coco": "{root}/coco/annotations/instances_{{train,val}}2017.json and "
            "{root}/coco/{{train,val}}2017/*.jpg (person_keypoints_*.json for keypoints)",
    "lvis": "{root}/lvis/lvis_v0.5_{{train,val}}.json (or lvis_v1_*) and the COCO 2017 images "
            "under {root}/coco/{{train,val}}2017/",
    "pascal_voc": "{root}/VOC20XX/Annotations/*.xml, JPEGImages/*.jpg, "
                  "ImageSets/Main/{{trainval,test}}.txt",
    "cityscapes_instance": "{root}/cityscapes/leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png "
                           "and {root}/cityscapes/gtFine/{{train,val}}/<city>/*_gtFine_"
                           "{{instanceIds,labelIds,polygons.json}}",
    "cityscapes_sem_seg": "{root}/cityscapes/leftImg8bit/... and gtFine/*_labelTrainIds.png",
    "sem_seg": "{root}/VOC2012/JPEGImages/*.jpg, {root}/VOC2012/SegmentationClassAug/*.png and "
               "{root}/VOC2012/ImageSets/Segmentation/{{train_aug,val}}.txt (SBD-augmented "
               "VOC 2012: 10582 train_aug, 1449 val)",
    "densepose": "{root}/coco/annotations/densepose_{{train,valminusminival,minival}}2014.json "
                 "(DensePose-COCO: dp_x, dp_y, dp_I, dp_U, dp_V, dp_masks per person) and the "
                 "COCO 2014 images under {root}/coco/{{train2014,val2014}}/; optional data files "
                 "in {root}/densepose/ (UV_symmetry_transforms.mat, SMPL_subdiv.mat, "
                 "SMPL_SUBDIV_TRANSFORM.mat, Pdist_matrix.pkl); to try it on generated data: "
                 "python -m tools.fixtures.densepose ROOT",
}


def _paths_to_check(meta):
    """(path, is_dir) pairs that must exist for a registered dataset."""
    et = meta.get("evaluator_type", "")
    if et == "pascal_voc":
        d = meta.dirname
        return [(os.path.join(d, "Annotations"), True), (os.path.join(d, "JPEGImages"), True),
                (os.path.join(d, "ImageSets", "Main", meta.split + ".txt"), False)]
    if et.startswith("cityscapes"):
        return [(meta.image_dir, True), (meta.gt_dir, True)]
    paths = []
    d = meta.as_dict()
    for key, is_dir in (("json_file", False), ("image_root", True), ("sem_seg_root", True),
                        ("list_file", False)):
        if key in d:
            paths.append((d[key], is_dir))
    return paths


def check_datasets(names):
    """Raise DatasetMissing naming the folder and layout expected for every missing dataset."""
    problems = []
    for name in names:
        if name not in DatasetCatalog.list():
            raise DatasetMissing(f"dataset '{name}' is not registered; registered ones include "
                                 f"{', '.join(sorted(DatasetCatalog.list())[:12])}, ...")
        meta = MetadataCatalog.get(name)
        missing = [p for p, is_dir in _paths_to_check(meta)
                   if not (os.path.isdir(p) if is_dir else os.path.isfile(p))]
        if missing:
            layout = LAYOUTS.get(meta.get("evaluator_type", ""), "").format(root=dataset_root())
            problems.append(
                f"dataset '{name}' not found: missing {', '.join(missing)}\n"
                f"  expected layout: {layout}\n"
                f"  dataset root: {dataset_root()} (set DETECTRON2_DATASETS to change it)")
    if problems:
        raise DatasetMissing("\n".join(problems))


# ---------------------------------------------------------------- mappers, by model
# A model family that needs its own dataset mapper registers it here from its own module
# (semseg.py, densepose/data.py); everything else gets detectron2's DatasetMapper.
MAPPERS = {}


def register_mapper(model_key, train=True, test=False):
    """Register ``builder(cfg, is_train)`` for models whose ROI_HEADS.NAME or
    META_ARCHITECTURE is ``model_key``."""
    def deco(builder):
        for is_train, wanted in ((True, train), (False, test)):
            if wanted:
                MAPPERS[(model_key, is_train)] = builder
        return builder
    return deco


def build_mapper(cfg, is_train):
    for key in (cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.META_ARCHITECTURE):
        if (key, is_train) in MAPPERS:
            return MAPPERS[(key, is_train)](cfg, is_train)
    return DatasetMapper(cfg, is_train)


# ---------------------------------------------------------------- synthetic (embedded default)
SYNTHETIC_SPLITS = {"synthetic_train": "train", "synthetic_val": "val"}


def register_synthetic(root=None):
    """Register the generated shapes dataset (``make demo`` writes it) as COCO-format datasets
    ``synthetic_train``/``synthetic_val`` (boxes + masks) under ``<root>/synthetic``. The class
    names come from the json's categories when the dataset is read."""
    base = os.path.join(root or dataset_root(), "synthetic", "coco")
    for name, split in SYNTHETIC_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        register_coco_instances(name, {}, os.path.join(base, "annotations",
                                                       f"instances_{split}.json"),
                                os.path.join(base, split))


register_synthetic()
