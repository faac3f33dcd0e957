"""Semantic segmentation of the MoCo paper (Table 6): an FCN on a dilated ResNet-50.

- ``FCNHead``: two 3x3 convs (256 channels, dilation 6, norm + ReLU) on res5 (output stride 16:
  res5 dilated by 2 with stride 1), a 1x1 classifier, bilinear upsampling to the input size,
  cross-entropy ignoring label 255. Logits cover any input size pixel for pixel:
  ``upsample_to_pixels`` below says how.
- ``SemSegCropMapper``: training augmentation of the protocol: random scale in
  ``MODEL.SEM_SEG_HEAD.SCALE_RANGE``, padding to the crop (image with the pixel mean, label with
  the ignore value), random crop ``INPUT.CROP.SIZE``, horizontal flip. Test images are used at
  full size.
- Datasets: Cityscapes fine (detectron2's ``cityscapes_fine_sem_seg_*``; ``*_labelIds.png`` are
  mapped to train ids with cityscapesscripts' label table when ``*_labelTrainIds.png`` are
  absent) and VOC 2012 with SBD augmentation (``voc_2012_train_aug_sem_seg``: 10582 images,
  ``voc_2012_val_sem_seg``: 1449) in the standard ``SegmentationClassAug`` layout.
"""
import copy
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.datasets.cityscapes import _get_cityscapes_files
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
import fvcore.nn.weight_init as weight_init

from transfer.datasets import dataset_root, register_mapper

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def upsample_to_pixels(x, stride):
    """Logits at stride ``stride`` -> logits per input pixel, ``stride * n`` pixels per axis.

    Every conv of the ResNet and of the head pads symmetrically (7x7 pad 3, 3x3 pad
    dilation, 1x1 pad 0, max-pool 3x3 pad 1), so feature i of an axis is centred on input
    pixel ``stride * i``: the features sit on a corner-aligned grid. Pixel j therefore reads
    feature position j / stride: bilinear with ``align_corners=True`` from n features to
    ``stride * (n - 1) + 1`` pixels, then the border feature repeated for the pixels past the
    last centre (at most stride - 1 of them). A ``W``-pixel input gives n = ceil(W / stride)
    features, so the result covers the input; callers cut it to the label or image (top-left
    aligned, as detectron2 pads batches). Sizes stride * k + 1 (crops 513 = 32 * 16 + 1 and
    769 = 48 * 16 + 1) need no repeated border. ``align_corners=False`` with
    ``scale_factor=stride`` would put pixel j on feature (j + 0.5) / stride - 0.5, a shift of
    (stride - 1) / 2 = 7.5 pixels, and give stride * n pixels that do not match the label.
    """
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(stride * (h - 1) + 1, stride * (w - 1) + 1), mode="bilinear",
                      align_corners=True)
    return F.pad(x, (0, stride - 1, 0, stride - 1), mode="replicate")


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(nn.Module):
    def __init__(self, cfg, input_shape):
        super().__init__()
        head = cfg.MODEL.SEM_SEG_HEAD
        self.in_feature = head.IN_FEATURES[0]
        shape = input_shape[self.in_feature]
        self.common_stride = shape.stride
        self.ignore_value = head.IGNORE_VALUE
        self.loss_weight = head.LOSS_WEIGHT
        d = head.FCN_DILATION
        convs = []
        in_ch = shape.channels
        for _ in range(2):
            conv = Conv2d(in_ch, head.CONVS_DIM, kernel_size=3, padding=d, dilation=d,
                          bias=not head.NORM, norm=get_norm(head.NORM, head.CONVS_DIM),
                          activation=F.relu)
            weight_init.c2_msra_fill(conv)
            convs.append(conv)
            in_ch = head.CONVS_DIM
        self.convs = nn.Sequential(*convs)
        self.predictor = Conv2d(in_ch, head.NUM_CLASSES, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    def forward(self, features, targets=None):
        x = self.predictor(self.convs(features[self.in_feature]))
        x = upsample_to_pixels(x, self.common_stride)
        if self.training:
            x = x[..., : targets.shape[-2], : targets.shape[-1]]
            loss = F.cross_entropy(x, targets, reduction="mean", ignore_index=self.ignore_value)
            return None, {"loss_sem_seg": loss * self.loss_weight}
        return x, {}


# ---------------------------------------------------------------- data
_CITYSCAPES_LUT = None


def cityscapes_label_ids_to_train_ids(label):
    global _CITYSCAPES_LUT
    if _CITYSCAPES_LUT is None:
        from cityscapesscripts.helpers.labels import labels

        lut = np.full(256, 255, dtype=np.uint8)
        for lab in labels:
            if 0 <= lab.id < 256 and 0 <= lab.trainId < 255:
                lut[lab.id] = lab.trainId
        _CITYSCAPES_LUT = lut
    return _CITYSCAPES_LUT[label]


def read_sem_seg(path):
    """uint8 label map; Cityscapes labelIds are mapped to train ids if no train-id file."""
    if not os.path.exists(path) and path.endswith("_labelTrainIds.png"):
        raw = path.replace("_labelTrainIds.png", "_labelIds.png")
        return cityscapes_label_ids_to_train_ids(utils.read_image(raw).astype(np.uint8))
    return utils.read_image(path).astype(np.uint8)


@register_mapper("SemanticSegmentor", train=True, test=True)
class SemSegCropMapper:
    """Random scale, pad (ignore label), random crop and flip, with image and label aligned."""

    def __init__(self, cfg, is_train=True):
        self.is_train = is_train
        self.format = cfg.INPUT.FORMAT
        self.scale_range = tuple(cfg.MODEL.SEM_SEG_HEAD.SCALE_RANGE)
        self.crop = tuple(cfg.INPUT.CROP.SIZE)  # (h, w)
        self.ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        mean = list(cfg.MODEL.PIXEL_MEAN)
        self.pad_value = mean  # pads become 0 after normalisation

    def transforms(self, h, w, rng=np.random):
        s = rng.uniform(*self.scale_range)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        tfms = [T.ScaleTransform(h, w, nh, nw, interp="bilinear")]
        ch, cw = self.crop
        ph, pw = max(0, ch - nh), max(0, cw - nw)
        if ph or pw:
            tfms.append(T.PadTransform(0, 0, pw, ph, nw, nh, pad_value=0,
                                       seg_pad_value=self.ignore))
        H, W = nh + ph, nw + pw
        y0, x0 = rng.randint(0, H - ch + 1), rng.randint(0, W - cw + 1)
        tfms.append(T.CropTransform(x0, y0, cw, ch))
        if rng.rand() < 0.5:
            tfms.append(T.HFlipTransform(cw))
        return T.TransformList(tfms)

    def apply(self, image, label, rng=np.random):
        tfm = self.transforms(*image.shape[:2], rng)
        pad_mask = tfm.apply_segmentation(np.ones(image.shape[:2], np.uint8)) != 1
        image = tfm.apply_image(image).astype(np.float32)
        label = tfm.apply_segmentation(label)
        image[pad_mask] = self.pad_value  # padded pixels: the pixel mean (0 once normalised)
        return image, label

    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.format)
        label = read_sem_seg(d["sem_seg_file_name"]) if "sem_seg_file_name" in d else None
        if self.is_train:
            image, label = self.apply(image, label)
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            d["sem_seg"] = torch.as_tensor(label.astype(np.int64))
        return d


def load_voc_sem_seg(root, split):
    list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    with open(list_file) as f:
        ids = [line.strip() for line in f if line.strip()]
    return [{"file_name": os.path.join(root, "JPEGImages", i + ".jpg"),
             "sem_seg_file_name": os.path.join(root, "SegmentationClassAug", i + ".png"),
             "image_id": i} for i in ids]


def register_voc_sem_seg(dataset_root):
    root = os.path.join(dataset_root, "VOC2012")
    for name, split in (("voc_2012_train_aug_sem_seg", "train_aug"),
                        ("voc_2012_val_sem_seg", "val")):
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda s=split: load_voc_sem_seg(root, s))
        MetadataCatalog.get(name).set(
            stuff_classes=VOC_CLASSES, ignore_label=255, evaluator_type="sem_seg",
            image_root=os.path.join(root, "JPEGImages"),
            sem_seg_root=os.path.join(root, "SegmentationClassAug"),
            list_file=os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"))


def load_cityscapes_semantic(image_dir, gt_dir):
    """detectron2's Cityscapes semantic loader, minus its demand for *_labelTrainIds.png:
    without them, the mapper maps *_labelIds.png through cityscapesscripts' label table."""
    ret = []
    for image_file, _, label_file, json_file in _get_cityscapes_files(image_dir, gt_dir):
        with open(json_file) as f:
            size = json.load(f)
        ret.append({"file_name": image_file,
                    "sem_seg_file_name": label_file.replace("labelIds", "labelTrainIds"),
                    "height": size["imgHeight"], "width": size["imgWidth"]})
    if not ret:
        raise FileNotFoundError(f"no Cityscapes images found in {image_dir}")
    return ret


def reregister_cityscapes_semantic():
    for name in ("cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val"):
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda m=meta: load_cityscapes_semantic(m.image_dir,
                                                                                m.gt_dir))


register_voc_sem_seg(dataset_root())
reregister_cityscapes_semantic()
