"""DensePose-COCO datasets and the training mapper.

Datasets (detectron2's DensePose names), under ``DETECTRON2_DATASETS``:
    densepose_coco_2014_train           coco/train2014/  coco/annotations/densepose_train2014.json
    densepose_coco_2014_valminusminival coco/val2014/    .../densepose_valminusminival2014.json
    densepose_coco_2014_minival         coco/val2014/    .../densepose_minival2014.json
"""
import logging
import os

import detectron2.data.detection_utils as utils
import detectron2.data.transforms as T
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from transfer.datasets import dataset_root, register_mapper
from transfer.densepose.config import UV_SYMMETRY_FILE, densepose_data_dir
from transfer.densepose.structures import (
    DP_KEYS, DensePoseData, DensePoseList, has_densepose, load_uv_symmetries)

logger = logging.getLogger(__name__)

DATASETS = {
    "densepose_coco_2014_train": ("coco/train2014", "coco/annotations/densepose_train2014.json"),
    "densepose_coco_2014_valminusminival": (
        "coco/val2014", "coco/annotations/densepose_valminusminival2014.json"),
    "densepose_coco_2014_minival": ("coco/val2014", "coco/annotations/densepose_minival2014.json"),
}


def register_densepose_coco(root):
    for name, (images, annotations) in DATASETS.items():
        if name in DatasetCatalog.list():
            continue
        json_file = os.path.join(root, annotations)
        image_root = os.path.join(root, images)
        DatasetCatalog.register(name, lambda j=json_file, i=image_root, n=name: load_coco_json(
            j, i, n, extra_annotation_keys=list(DP_KEYS)))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                      evaluator_type="densepose", thing_classes=["person"])


_WARNED_NO_FLIP = set()


def _without_flip(augs, uv_symmetries, folder):
    if uv_symmetries:
        return augs
    kept = [a for a in augs if not isinstance(a, T.RandomFlip)]
    if len(kept) != len(augs) and folder not in _WARNED_NO_FLIP:  # once per process
        _WARNED_NO_FLIP.add(folder)
        logger.warning(
            "DensePose training without horizontal flip: flipping U/V needs the official UV "
            "symmetry file %s, not found in %s (DENSEPOSE.DATA, default "
            "$DETECTRON2_DATASETS/densepose/)", UV_SYMMETRY_FILE, folder)
    return kept


@register_mapper("DensePoseROIHeads")
class DensePoseDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper (boxes, classes) plus ``instances.gt_densepose``: the points
    and part masks stay in each box's frame, so they follow any resize of the image; a
    horizontal flip mirrors them and swaps left/right labels with the UV symmetry tables."""

    @configurable
    def __init__(self, is_train, *, uv_symmetries=None, **kwargs):
        super().__init__(is_train, **kwargs)
        self.uv_symmetries = uv_symmetries

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        folder = densepose_data_dir(cfg.DENSEPOSE.DATA)
        path = os.path.join(folder, UV_SYMMETRY_FILE)
        ret["uv_symmetries"] = load_uv_symmetries(path) if os.path.isfile(path) else None
        ret["augmentations"] = _without_flip(ret["augmentations"], ret["uv_symmetries"], folder)
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        flips = 0
        for t in transforms.transforms:
            if isinstance(t, T.HFlipTransform):
                flips += 1
            elif not isinstance(t, (T.ResizeTransform, T.NoOpTransform)):
                raise ValueError(f"DensePose annotations follow resizes and horizontal flips "
                                 f"only, not {type(t).__name__}")
        annos, dps = [], []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0):
                continue
            dp = DensePoseData.from_annotation(obj) if has_densepose(obj) else None
            if dp is not None and flips % 2:
                dp.hflip(self.uv_symmetries)
            for k in DP_KEYS + ("segmentation", "keypoints"):
                obj.pop(k, None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
            dps.append(dp)
        instances = utils.annotations_to_instances(annos, image_shape)
        instances.gt_densepose = DensePoseList(dps)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)


register_densepose_coco(dataset_root())
