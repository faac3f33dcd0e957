"""DensePose config keys (merged by transfer.config.get_cfg, so every entry point has them).

Names follow detectron2's DensePose project; the defaults are the paper's "legacy" s1x head
(PROTOCOL.md, COCO DensePose row; detectron2 v0.6 densepose_rcnn_R_50_FPN_s1x_legacy.yaml)."""
import os

from detectron2.config import CfgNode as CN

from transfer.datasets import dataset_root


def add_densepose_config(cfg):
    cfg.MODEL.DENSEPOSE_ON = False
    h = cfg.MODEL.ROI_DENSEPOSE_HEAD = CN()
    h.NAME = "DensePoseV1ConvXHead"
    h.NUM_STACKED_CONVS = 8
    h.CONV_HEAD_DIM = 512
    h.CONV_HEAD_KERNEL = 3
    h.DECONV_KERNEL = 4  # 14x14 -> 28x28, then bilinear x UP_SCALE -> 56x56
    h.UP_SCALE = 2
    h.HEATMAP_SIZE = 56
    h.NUM_PATCHES = 24  # charts; fine segmentation has NUM_PATCHES + 1 channels
    h.NUM_COARSE_SEGM_CHANNELS = 15  # background + 14 parts, trained by the part masks
    h.POOLER_TYPE = "ROIAlign"
    h.POOLER_RESOLUTION = 14
    h.POOLER_SAMPLING_RATIO = 2
    h.FG_IOU_THRESHOLD = 0.7  # proposals trained by the head: IoU with their person > 0.7
    h.INDEX_WEIGHTS = 2.0  # coarse segmentation (part masks) cross-entropy
    h.PART_WEIGHTS = 0.3  # chart index cross-entropy at the annotated points
    h.POINT_REGRESSION_WEIGHTS = 0.1  # smooth-L1 on U and V at the annotated points (summed)
    h.DECODER_ON = False  # the legacy head has no panoptic-FPN decoder (none is implemented)
    cfg.DENSEPOSE = CN()
    # Folder with the official DensePose data files; "" = $DETECTRON2_DATASETS/densepose/.
    #   UV_symmetry_transforms.mat: needed to flip U/V; without it training does not flip
    #   SMPL_subdiv.mat, SMPL_SUBDIV_TRANSFORM.mat, Pdist_matrix.pkl: geodesics for GPS;
    #   without them the evaluation reports box and mask AP only (and says why)
    cfg.DENSEPOSE.DATA = ""


UV_SYMMETRY_FILE = "UV_symmetry_transforms.mat"


def densepose_data_dir(cfg_value):
    """The folder of the DensePose data files (the configured one must exist)."""
    if cfg_value and not os.path.isdir(cfg_value):
        raise FileNotFoundError(f"DENSEPOSE.DATA folder '{cfg_value}' does not exist")
    return cfg_value or os.path.join(dataset_root(), "densepose")
