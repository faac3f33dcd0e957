"""Every task config against the protocol (PROTOCOL.md sections 3-4), and every model builds."""
import pickle

import numpy as np
import pytest
import torch
import torchvision

from transfer.config import get_cfg, setup_cfg, task_config_path
from transfer.tasks import known_tasks, schedule_iterations

VOC_TRAIN_SIZES = tuple(range(480, 801, 32))
COCO_TRAIN_SIZES = tuple(range(640, 801, 32))

# task: (meta, max_iter, steps, lr, warmup, batch, train sizes, test size, train sets, test sets, classes)
PROTOCOL = {
    "voc_frcnn_c4_24k": ("c4", 24000, (18000, 22000), 0.02, 100, 16, VOC_TRAIN_SIZES, 800,
                         ("voc_2007_trainval", "voc_2012_trainval"), ("voc_2007_test",), 20),
    "voc_frcnn_dc5_24k": ("dc5", 24000, (18000, 22000), 0.02, 100, 16, VOC_TRAIN_SIZES, 800,
                          ("voc_2007_trainval", "voc_2012_trainval"), ("voc_2007_test",), 20),
    "voc07_frcnn_c4_9k": ("c4", 9000, None, 0.02, 100, 16, VOC_TRAIN_SIZES, 800,
                          ("voc_2007_trainval",), ("voc_2007_test",), 20),
    "coco_mask_fpn_1x": ("fpn_mask", 90000, (60000, 80000), 0.02, 1000, 16, COCO_TRAIN_SIZES, 800,
                         ("coco_2017_train",), ("coco_2017_val",), 80),
    "coco_mask_fpn_2x": ("fpn_mask", 180000, (120000, 160000), 0.02, 1000, 16, COCO_TRAIN_SIZES,
                         800, ("coco_2017_train",), ("coco_2017_val",), 80),
    "coco_mask_c4_1x": ("c4_mask", 90000, (60000, 80000), 0.02, 1000, 16, COCO_TRAIN_SIZES, 800,
                        ("coco_2017_train",), ("coco_2017_val",), 80),
    "coco_mask_c4_2x": ("c4_mask", 180000, (120000, 160000), 0.02, 1000, 16, COCO_TRAIN_SIZES,
                        800, ("coco_2017_train",), ("coco_2017_val",), 80),
    "coco_kp_fpn_2x": ("fpn_kp", 180000, (120000, 160000), 0.02, 1000, 16, COCO_TRAIN_SIZES, 800,
                       ("keypoints_coco_2017_train",), ("keypoints_coco_2017_val",), 1),
    "lvis_mask_fpn_1x": ("fpn_mask", 90000, (60000, 80000), 0.02, 1000, 16, COCO_TRAIN_SIZES,
                         800, ("lvis_v0.5_train",), ("lvis_v0.5_val",), 1230),
    "lvis_mask_fpn_2x": ("fpn_mask", 180000, (120000, 160000), 0.02, 1000, 16, COCO_TRAIN_SIZES,
                         800, ("lvis_v0.5_train",), ("lvis_v0.5_val",), 1230),
    "coco_densepose_fpn_s1x": ("fpn_dp", 130000, (100000, 120000), 0.002, 1000, 16,
                               COCO_TRAIN_SIZES, 800,
                               ("densepose_coco_2014_train", "densepose_coco_2014_valminusminival"),
                               ("densepose_coco_2014_minival",), 1),
    "cityscapes_mask_fpn_24k": ("fpn_mask", 24000, (18000,), 0.01, 1000, 8,
                                tuple(range(800, 1025, 32)), 1024,
                                ("cityscapes_fine_instance_seg_train",),
                                ("cityscapes_fine_instance_seg_val",), 8),
}


def test_every_task_is_in_the_protocol_table():
    assert sorted(PROTOCOL) == sorted(t for t in known_tasks() if t in PROTOCOL)
    assert set(PROTOCOL) <= set(known_tasks())


@pytest.mark.parametrize("task", sorted(PROTOCOL))
def test_task_config_matches_protocol(task):
    meta, iters, steps, lr, warmup, batch, sizes, test_size, train, test, classes = PROTOCOL[task]
    cfg = setup_cfg(task, "random")
    assert cfg.SOLVER.MAX_ITER == iters == schedule_iterations(task)
    if steps:
        assert tuple(cfg.SOLVER.STEPS) == steps
    else:  # not published: must be inside the schedule and increasing
        assert list(cfg.SOLVER.STEPS) == sorted(cfg.SOLVER.STEPS) and max(cfg.SOLVER.STEPS) < iters
    assert cfg.SOLVER.BASE_LR == lr and cfg.SOLVER.WARMUP_ITERS == warmup
    assert cfg.SOLVER.IMS_PER_BATCH == batch
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == sizes and cfg.INPUT.MIN_SIZE_TEST == test_size
    assert tuple(cfg.DATASETS.TRAIN) == train and tuple(cfg.DATASETS.TEST) == test
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == classes
    # BN trained and synchronised everywhere, nothing frozen, PreciseBN on
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.TEST.PRECISE_BN.ENABLED
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MOCO_TRANSFER.METRICS and cfg.MOCO_TRANSFER.PAPER_TABLE
    if meta.startswith("c4"):
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
        assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    elif meta == "dc5":
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_dc5_backbone"
        assert cfg.MODEL.RESNETS.RES5_DILATION == 2
        assert cfg.MODEL.DC5.OUT_CHANNELS == 512 and cfg.MODEL.DC5.NORM == "naiveSyncBN"
        assert cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 2 and cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 0
    else:  # FPN: norm on backbone and FPN only, standard heads
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
        assert cfg.MODEL.FPN.NORM == "naiveSyncBN"
        assert cfg.MODEL.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead"
        assert cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 2 and cfg.MODEL.ROI_BOX_HEAD.NORM == ""
        assert cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4 and cfg.MODEL.ROI_MASK_HEAD.NORM == ""
    assert cfg.MODEL.MASK_ON == ("mask" in meta)
    assert cfg.MODEL.KEYPOINT_ON == (meta == "fpn_kp")
    if meta == "fpn_kp":
        assert cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA == 0.5
        assert cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 1500
    assert cfg.MODEL.DENSEPOSE_ON == (meta == "fpn_dp")
    if meta == "fpn_dp":  # the legacy s1x head (PROTOCOL.md, COCO DensePose)
        h = cfg.MODEL.ROI_DENSEPOSE_HEAD
        assert cfg.MODEL.ROI_HEADS.NAME == "DensePoseROIHeads"
        assert (h.NAME, h.NUM_STACKED_CONVS, h.CONV_HEAD_DIM) == ("DensePoseV1ConvXHead", 8, 512)
        assert (h.POOLER_RESOLUTION, h.HEATMAP_SIZE, h.NUM_COARSE_SEGM_CHANNELS) == (14, 56, 15)
        assert (h.INDEX_WEIGHTS, h.PART_WEIGHTS, h.POINT_REGRESSION_WEIGHTS) == (2.0, 0.3, 0.1)
        assert h.NUM_PATCHES == 24 and cfg.SOLVER.WARMUP_FACTOR == 0.1
        assert cfg.DENSEPOSE.KAPPA == 0.255
    if task.startswith("lvis"):
        assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0001
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
        assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
    if task.startswith("cityscapes"):
        assert cfg.INPUT.MAX_SIZE_TRAIN == 2048 and cfg.INPUT.MAX_SIZE_TEST == 2048
        assert cfg.MODEL.WEIGHTS == ""  # never a COCO-trained start


def test_schedule_tokens():
    assert schedule_iterations("coco_mask_fpn_2x") == 180000
    assert schedule_iterations("voc_frcnn_c4_24k") == 24000
    assert schedule_iterations("coco_densepose_fpn_s1x") == 130000


def test_weights_set_normalisation():
    sup = setup_cfg("voc_frcnn_c4_24k", "supervised")
    assert sup.INPUT.FORMAT == "BGR" and sup.MODEL.RESNETS.STRIDE_IN_1X1
    assert list(sup.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    assert sup.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    rnd = setup_cfg("voc_frcnn_c4_24k", "random")
    assert rnd.INPUT.FORMAT == "RGB" and not rnd.MODEL.RESNETS.STRIDE_IN_1X1
    assert list(rnd.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53] and rnd.MODEL.WEIGHTS == ""


def test_smoke_scale_changes_only_schedule_and_sizes():
    full = setup_cfg("coco_mask_fpn_2x", "random")
    smoke = setup_cfg("coco_mask_fpn_2x", "random", scale="smoke")
    assert smoke.SOLVER.MAX_ITER == 20 and smoke.SOLVER.IMS_PER_BATCH == 2
    assert smoke.MODEL.META_ARCHITECTURE == full.MODEL.META_ARCHITECTURE
    assert smoke.MODEL.ROI_HEADS.NAME == full.MODEL.ROI_HEADS.NAME
    assert smoke.DATASETS.TEST == full.DATASETS.TEST
    assert smoke.OUTPUT_DIR.endswith("coco_mask_fpn_2x@smoke/random/seed0")


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="voc_frcnn_c4_24k"):
        task_config_path("voc_frcnn_c5_99k")


@pytest.mark.parametrize("task", sorted(PROTOCOL))
def test_every_task_builds_its_model_on_cpu(task):
    from transfer.train_net import Trainer

    cfg = setup_cfg(task, "random")
    model = Trainer.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 20e6


@pytest.fixture(scope="module")
def converted_r50(tmp_path_factory):
    from convert.to_detectron2 import convert, write_atomic

    torch.manual_seed(0)
    sd = torchvision.models.resnet50(num_classes=128).state_dict()
    for v in sd.values():
        if v.dtype.is_floating_point:
            v.copy_(torch.randn_like(v))
    tmp = tmp_path_factory.mktemp("w")
    torch.save({"arch": "resnet50", "state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}},
               tmp / "moco.pth.tar")
    out, _ = convert(str(tmp / "moco.pth.tar"))
    write_atomic(out, str(tmp / "moco.pkl"))
    return str(tmp / "moco.pkl"), out["model"]


@pytest.mark.parametrize("task,prefix", [("voc_frcnn_c4_24k", ""),
                                         ("coco_mask_fpn_1x", "backbone.bottom_up."),
                                         ("voc_frcnn_dc5_24k", "backbone.bottom_up.")])
def test_converted_moco_r50_fills_every_backbone_tensor(converted_r50, task, prefix):
    from transfer.train_net import Trainer
    from transfer.weights import load_pretrained, pretrained_resnet_keys

    path, model_dict = converted_r50
    cfg = setup_cfg(task, path)
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    model = Trainer.build_model(cfg)
    incompatible = load_pretrained(model, path)
    keys = pretrained_resnet_keys(model)
    assert len(keys) == 265 and not incompatible.incorrect_shapes
    assert not set(keys) & set(incompatible.missing_keys)
    state = model.state_dict()
    for name, value in model_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        target = (f"roi_heads.{name}" if name.startswith("res5") and task.startswith("voc_frcnn_c4")
                  else (f"backbone.{name}" if not prefix else prefix + name))
        np.testing.assert_array_equal(state[target].numpy(), value)


def test_weights_that_fit_nothing_are_refused(tmp_path):
    from transfer.train_net import Trainer
    from transfer.weights import WeightsNotLoaded, load_pretrained

    bad = tmp_path / "empty.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"model": {"foo.weight": np.zeros(3)}, "__author__": "MOCO",
                     "matching_heuristics": True}, f)
    cfg = setup_cfg("voc_frcnn_c4_24k", "random")
    model = Trainer.build_model(cfg)
    with pytest.raises(WeightsNotLoaded, match="were not filled"):
        load_pretrained(model, str(bad))


@pytest.mark.parametrize("task", known_tasks())
def test_every_task_name_schedule_token_matches_its_iterations(task):
    cfg = get_cfg()
    cfg.merge_from_file(task_config_path(task))
    assert cfg.SOLVER.MAX_ITER == schedule_iterations(task)
    assert all(s < cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS)
