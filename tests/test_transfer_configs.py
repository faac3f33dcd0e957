"""Every task config against the protocol (PROTOCOL.md sections 3-4), and every model builds."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from transfer.config import get_cfg, setup_cfg
from transfer.configs import known_tasks, schedule_iterations, task_config_path

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


# Tasks with no row in PROTOCOL, each with where its settings are checked instead. A new task
# must be added to PROTOCOL or here, with a reason.
NOT_IN_PROTOCOL_TABLE = {
    # semantic segmentation (FCN head, crops, lr, steps): tests/test_semseg.py
    "voc_semseg_fcn_30k": "semantic segmentation, checked in tests/test_semseg.py",
    "cityscapes_semseg_fcn_90k": "semantic segmentation, checked in tests/test_semseg.py",
    # the demo on generated shapes (make demo): not a paper table; tests/test_demo.py runs it
    "synthetic_mask_fpn_1k": "embedded demo task, not a paper table",
    "synthetic_frcnn_fpn_1k": "the make-demo task (low-data, CPU-sized), not a paper table",
}


def test_every_task_is_in_the_protocol_table():
    assert not set(PROTOCOL) & set(NOT_IN_PROTOCOL_TABLE)
    assert sorted(known_tasks()) == sorted(set(PROTOCOL) | set(NOT_IN_PROTOCOL_TABLE))


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
        if "mask" in meta:  # (without a mask head its config is unused)
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
        assert (h.POOLER_TYPE, h.POOLER_SAMPLING_RATIO, h.FG_IOU_THRESHOLD) == ("ROIAlign", 2, 0.7)
        assert (cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
                cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO) == ("ROIAlign", 2)
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


# What each kind of weights was trained on (PROTOCOL.md section 3), written out here rather than
# imported from the code under test: torchvision/MoCo RGB in [0, 255] with ImageNet mean/std and
# the stride in the 3x3 conv; MSRA caffe BGR, mean only, stride in the 1x1 conv.
RGB_EXPECTED = ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], False)
BGR_EXPECTED = ("BGR", [103.53, 116.28, 123.675], [1.0, 1.0, 1.0], True)


def _weights_of_kind(kind, tmp):
    """A weights spec of the given kind, written to tmp where it is a file."""
    from convert.to_detectron2 import convert, write_atomic

    if kind in ("random", "supervised"):
        return kind
    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    if kind == "ours_moco":  # convert/to_detectron2.py on a MoCo checkpoint
        torch.save({"arch": "resnet18",
                    "state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}},
                   tmp / "moco.pth.tar")
        out, _ = convert(str(tmp / "moco.pth.tar"))
    elif kind == "ours_torchvision":  # convert/to_detectron2.py on a torchvision state dict
        torch.save(sd, tmp / "tv.pth")
        out, _ = convert(str(tmp / "tv.pth"))
    elif kind == "ours_msra_pkl":  # convert/to_detectron2.py passing an MSRA caffe2 .pkl through
        with open(tmp / "R-50.pkl", "wb") as f:
            pickle.dump({"model": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32),
                                   "res_conv1_bn_s": np.ones(64, np.float32)},
                         "__author__": "Caffe2"}, f)
        out, _ = convert(str(tmp / "R-50.pkl"))
    else:  # the reference converters' outputs: no metadata, only __author__
        author = {"reference_moco": "MOCO", "reference_torchvision": "torchvision"}[kind]
        out = {"model": {"stem.conv1.weight": sd["conv1.weight"].numpy()}, "__author__": author,
               "matching_heuristics": True}
    path = str(tmp / f"{kind}.pkl")
    write_atomic(out, path)
    return path


@pytest.mark.parametrize("kind,expected", [
    ("ours_moco", RGB_EXPECTED), ("ours_torchvision", RGB_EXPECTED),
    ("reference_moco", RGB_EXPECTED), ("reference_torchvision", RGB_EXPECTED),
    ("ours_msra_pkl", BGR_EXPECTED), ("supervised", BGR_EXPECTED), ("random", RGB_EXPECTED)])
def test_every_weights_kind_sets_its_normalisation(tmp_path, kind, expected):
    spec = _weights_of_kind(kind, tmp_path)
    cfg = setup_cfg("voc_frcnn_c4_24k", spec)
    fmt, mean, std, stride_in_1x1 = expected
    assert cfg.INPUT.FORMAT == fmt
    assert list(cfg.MODEL.PIXEL_MEAN) == mean
    assert list(cfg.MODEL.PIXEL_STD) == std
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is stride_in_1x1
    if kind == "random":
        assert cfg.MODEL.WEIGHTS == ""
    elif kind == "supervised":  # the registry's MSRA R-50, converted into the zoo's cache
        from convert import zoo

        entry = zoo.load_registry()["supervised"]
        assert entry.name == "msra_r50"
        assert cfg.MODEL.WEIGHTS == zoo.converted_path(entry, zoo.ZooOptions())
        assert cfg.MOCO_TRANSFER.WEIGHTS_ZOO_NAME == "msra_r50"
    else:
        assert cfg.MODEL.WEIGHTS == os.path.abspath(spec)
    if kind.startswith("ours_"):  # the converter's record of its source travels with the run
        assert cfg.MOCO_TRANSFER.WEIGHTS_SHA256 == pickle.load(open(spec, "rb"))[
            "moco_transfer"]["sha256"] != ""


def test_detectron2_pkl_without_metadata_from_an_unknown_author_is_refused(tmp_path):
    path = tmp_path / "other.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
                     "__author__": "someone"}, f)
    with pytest.raises(ValueError, match="carry no normalisation metadata"):
        setup_cfg("voc_frcnn_c4_24k", str(path))


def test_smoke_scale_changes_only_schedule_and_sizes():
    full = setup_cfg("coco_mask_fpn_2x", "random")
    smoke = setup_cfg("coco_mask_fpn_2x", "random", scale="smoke")
    assert smoke.SOLVER.MAX_ITER == 20 and smoke.SOLVER.IMS_PER_BATCH == 2
    # lr scaled linearly with the batch (0.02 x 2 / 16); steps 120k, 160k of 180k -> 13, 18 of 20
    assert smoke.SOLVER.BASE_LR == pytest.approx(0.0025, rel=1e-12)
    assert tuple(smoke.SOLVER.STEPS) == (13, 18)
    assert smoke.SOLVER.WARMUP_ITERS == 5
    assert tuple(full.SOLVER.STEPS) == (120000, 160000) and full.SOLVER.BASE_LR == 0.02
    assert smoke.MODEL.META_ARCHITECTURE == full.MODEL.META_ARCHITECTURE
    assert smoke.MODEL.ROI_HEADS.NAME == full.MODEL.ROI_HEADS.NAME
    assert smoke.DATASETS.TEST == full.DATASETS.TEST
    assert smoke.OUTPUT_DIR.endswith("coco_mask_fpn_2x@smoke/random/seed0")


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="voc_frcnn_c4_24k"):
        task_config_path("voc_frcnn_c5_99k")


@pytest.mark.parametrize("task", sorted(PROTOCOL))
def test_every_task_builds_its_model_on_cpu(task):
    from transfer.trainer import Trainer

    cfg = setup_cfg(task, "random")
    model = Trainer.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 20e6
    assert_all_trainable_no_frozen_bn(model)


def assert_all_trainable_no_frozen_bn(model):
    """The protocol fine-tunes everything: no frozen stage, BN trained and synchronised."""
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.layers.batch_norm import NaiveSyncBatchNorm

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not frozen, frozen[:5]
    assert not [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is NaiveSyncBatchNorm for m in norms), \
        sorted({type(m).__name__ for m in norms})


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
    return str(tmp / "moco.pkl"), sd


# torchvision name piece -> detectron2 name piece, written out as a table (not the converter's
# rules): the stem, the four stages, and inside a block the three conv/bn pairs and the shortcut.
STEM = {"conv1": "stem.conv1", "bn1": "stem.conv1.norm"}
STAGES = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}
IN_BLOCK = {"conv1": "conv1", "bn1": "conv1.norm", "conv2": "conv2", "bn2": "conv2.norm",
            "conv3": "conv3", "bn3": "conv3.norm", "downsample.0": "shortcut",
            "downsample.1": "shortcut.norm"}


def detectron2_name(torchvision_key):
    """'layer2.0.bn1.weight' -> 'res3.0.conv1.norm.weight'; 'bn1.bias' -> 'stem.conv1.norm.bias'."""
    module, leaf = torchvision_key.rsplit(".", 1)
    if module in STEM:
        return f"{STEM[module]}.{leaf}"
    stage, block, part = module.split(".", 2)
    return f"{STAGES[stage]}.{block}.{IN_BLOCK[part]}.{leaf}"


def test_independent_rename_table_spot_checks():
    assert detectron2_name("layer4.2.bn3.running_var") == "res5.2.conv3.norm.running_var"
    assert detectron2_name("layer1.0.downsample.1.weight") == "res2.0.shortcut.norm.weight"
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"


@pytest.mark.parametrize("task,prefix", [("voc_frcnn_c4_24k", ""),
                                         ("coco_mask_fpn_1x", "backbone.bottom_up."),
                                         ("voc_frcnn_dc5_24k", "backbone.bottom_up.")])
def test_converted_moco_r50_fills_every_backbone_tensor(converted_r50, task, prefix, monkeypatch):
    from transfer.trainer import Trainer
    from transfer.checkpoint import TransferCheckpointer, pretrained_resnet_keys

    path, source = converted_r50
    cfg = setup_cfg(task, path)
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    model = Trainer.build_model(cfg)
    # the .pkl setup_cfg read for its metadata is the one loaded: not unpickled a second time
    from detectron2.checkpoint import detection_checkpoint

    def no_second_read(*args, **kwargs):
        raise AssertionError("the converted .pkl was unpickled twice")

    monkeypatch.setattr(detection_checkpoint.pickle, "load", no_second_read)
    checkpointer = TransferCheckpointer(model)
    checkpointer.load(path, checkpointables=[])
    monkeypatch.undo()
    incompatible = checkpointer.incompatible
    keys = pretrained_resnet_keys(model)
    assert len(keys) == 265 and not incompatible.incorrect_shapes
    assert not set(keys) & set(incompatible.missing_keys)
    state = model.state_dict()
    checked = 0
    for key, value in source.items():  # the model's tensors against the torchvision source
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        name = detectron2_name(key)
        target = (f"roi_heads.{name}" if name.startswith("res5") and task.startswith("voc_frcnn_c4")
                  else (f"backbone.{name}" if not prefix else prefix + name))
        np.testing.assert_array_equal(state[target].numpy(), value.numpy(), err_msg=key)
        checked += 1
    assert checked == 265


def test_weights_that_fit_nothing_are_refused(tmp_path):
    from transfer.trainer import Trainer
    from transfer.checkpoint import TransferCheckpointer, WeightsNotLoaded

    bad = tmp_path / "empty.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"model": {"foo.weight": np.zeros(3)}, "__author__": "MOCO",
                     "matching_heuristics": True}, f)
    cfg = setup_cfg("voc_frcnn_c4_24k", "random")
    model = Trainer.build_model(cfg)
    with pytest.raises(WeightsNotLoaded, match="were not filled"):
        TransferCheckpointer(model).load(str(bad), checkpointables=[])
    # evaluation-only goes through the same strict load
    cfg = setup_cfg("voc_frcnn_c4_24k", "random", output=str(tmp_path / "run"),
                    overrides=["MODEL.WEIGHTS", str(bad)])
    with pytest.raises(WeightsNotLoaded, match="were not filled"):
        Trainer.evaluate_saved(cfg)


@pytest.mark.parametrize("task", known_tasks())
def test_every_task_name_schedule_token_matches_its_iterations(task):
    cfg = get_cfg()
    cfg.merge_from_file(task_config_path(task))
    assert cfg.SOLVER.MAX_ITER == schedule_iterations(task)
    assert all(s < cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS)
