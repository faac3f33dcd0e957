"""Semantic segmentation (FCN): architecture, mapper alignment, mIoU, smoke trainings."""
import os

import numpy as np
import pytest
import torch

from tests.conftest import requires_shared
from transfer.config import setup_cfg


def test_fcn_output_stride_and_dilations():
    from transfer.trainer import Trainer

    cfg = setup_cfg("cityscapes_semseg_fcn_90k", "random")
    model = Trainer.build_model(cfg)
    assert model.backbone.output_shape()["res5"].stride == 16
    res5 = model.backbone.res5
    assert all(b.conv2.dilation == (2, 2) for b in res5)
    assert res5[0].conv1.stride == (1, 1) and res5[0].conv2.stride == (1, 1)
    assert res5[0].shortcut.stride == (1, 1)
    head = model.sem_seg_head
    assert [c.dilation for c in head.convs] == [(6, 6), (6, 6)]
    assert [c.out_channels for c in head.convs] == [256, 256]
    assert all(c.norm is not None for c in head.convs)
    assert head.predictor.kernel_size == (1, 1) and head.predictor.out_channels == 19
    model.eval()
    with torch.no_grad():  # a VOC-sized image (not a multiple of 16) predicted at its size
        out = model([{"image": torch.zeros(3, 375, 500)}])
    assert out[0]["sem_seg"].shape == (19, 375, 500)
    cfg = setup_cfg("voc_semseg_fcn_30k", "random")
    assert cfg.SOLVER.STEPS == (21000, 27000) and cfg.SOLVER.MAX_ITER == 30000
    assert cfg.SOLVER.BASE_LR == 0.003 and tuple(cfg.INPUT.CROP.SIZE) == (513, 513)
    cfg = setup_cfg("cityscapes_semseg_fcn_90k", "random")
    assert cfg.SOLVER.STEPS == (63000, 81000) and cfg.SOLVER.BASE_LR == 0.01
    assert tuple(cfg.INPUT.CROP.SIZE) == (769, 769) and cfg.SOLVER.IMS_PER_BATCH == 16
    assert tuple(cfg.MODEL.SEM_SEG_HEAD.SCALE_RANGE) == (0.5, 2.0)


def _mirror(half, dim):
    """half holds indices 0..c of an axis; the result (2c + 1 long) is symmetric about c."""
    return torch.cat([half, half.narrow(dim, 0, half.shape[dim] - 1).flip(dim)], dim)


@pytest.mark.parametrize("task", ["voc_semseg_fcn_30k", "cityscapes_semseg_fcn_90k"])
def test_logits_are_aligned_with_pixels_at_sizes_not_multiple_of_16(task):
    """The whole model, with every conv kernel made mirror-symmetric, maps an image that is
    mirror-symmetric about pixel (c_y, c_x) = (16 * 3, 16 * 5) to logits symmetric about the
    same pixel: the logit of pixel j is the model's answer for pixel j, with no half-stride
    (7.5 px) shift. The image is 97 x 161 (not multiples of 16), fed as at test time, and the
    loss at train time is computed on a 97 x 161 label."""
    from transfer.trainer import Trainer

    cfg = setup_cfg(task, "random")
    model = Trainer.build_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1) + m.weight.flip(-2)
                                + m.weight.flip(-1, -2)) / 4)
        model.sem_seg_head.predictor.weight.normal_(0, 1.0)  # logits that vary visibly
        image = _mirror(_mirror(torch.rand(3, 16 * 3 + 1, 16 * 5 + 1) * 255, 1), 2)
        assert image.shape == (3, 97, 161)
        model.eval()
        logits = model([{"image": image}])[0]["sem_seg"]
    assert logits.shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 97, 161)
    spread = (logits - logits.mean((1, 2), keepdim=True)).abs().amax()
    assert spread > 1e-2  # not trivially symmetric
    for dim in (1, 2):
        assert (logits - logits.flip(dim)).abs().amax() < 1e-4 * spread, dim
    model.train()
    loss = model([{"image": image, "sem_seg": torch.zeros(97, 161, dtype=torch.long)}])
    assert torch.isfinite(loss["loss_sem_seg"])


def test_upsampling_reads_feature_j_over_stride():
    """Pixel j of the upsampled map is feature position j / 16 (exact for a linear ramp),
    and the pixels past the last feature centre repeat the border feature."""
    from transfer.semseg import upsample_to_pixels

    ramp = torch.arange(5, dtype=torch.float64).view(1, 1, 1, 5).expand(1, 1, 3, 5)
    up = upsample_to_pixels(ramp, 16)
    assert up.shape == (1, 1, 48, 80)
    j = torch.arange(80, dtype=torch.float64)
    torch.testing.assert_close(up[0, 0, 0], torch.clamp(j / 16, max=4.0))
    torch.testing.assert_close(up[0, 0, :, 40], torch.full((48,), 2.5, dtype=torch.float64))


def test_mapper_keeps_image_and_label_aligned():
    from transfer.semseg import SemSegCropMapper

    cfg = setup_cfg("voc_semseg_fcn_30k", "random", overrides=["INPUT.CROP.SIZE", "[96, 96]"])
    mapper = SemSegCropMapper(cfg)
    h, w = 96, 160
    yy, xx = np.mgrid[0:h, 0:w]
    # the image encodes each pixel's block (16x16 blocks), the label is a function of the block
    block_x, block_y = xx // 16, yy // 16
    image = np.stack([block_x * 16, block_y * 16, np.full_like(xx, 7)], -1).astype(np.uint8)
    label = ((block_x + 3 * block_y) % 21).astype(np.uint8)
    rng = np.random.RandomState(0)
    padded_seen = False
    for _ in range(20):
        img, lab = mapper.apply(image, label, rng)
        assert img.shape[:2] == lab.shape == (96, 96)
        valid = lab != 255
        padded_seen |= (~valid).any()
        # decode the block from the image (nearest block value), compare with the label
        bx = np.round(img[..., 0] / 16).astype(int)
        by = np.round(img[..., 1] / 16).astype(int)
        expected = (bx + 3 * by) % 21
        agree = (expected[valid] == lab[valid]).mean()
        assert agree > 0.9, agree  # only bilinear seams between blocks may differ
        shifted = (expected[:, 4:][valid[:, :-4]] == lab[:, :-4][valid[:, :-4]]).mean()
        assert shifted < agree  # a 4-pixel misalignment would show
        if (~valid).any():  # padding: ignore label, pixel mean in the image
            np.testing.assert_allclose(img[~valid], np.broadcast_to(cfg.MODEL.PIXEL_MEAN,
                                                                    img[~valid].shape))
    assert padded_seen


def _sem_seg_evaluator(tmp_path, gt):
    from PIL import Image

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    name = f"unit_sem_seg_{tmp_path.name}"
    Image.fromarray(gt.astype(np.uint8)).save(tmp_path / "gt.png")
    DatasetCatalog.register(name, lambda: [{"file_name": str(tmp_path / "im.jpg"),
                                            "sem_seg_file_name": str(tmp_path / "gt.png")}])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255)
    ev = SemSegEvaluator(name, distributed=False)
    ev.reset()
    return ev


def _scores(pred, k=3):
    return torch.nn.functional.one_hot(torch.as_tensor(pred).long(), k).permute(2, 0, 1).float()


def test_miou_perfect_and_known_confusion(tmp_path):
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255]])
    ev = _sem_seg_evaluator(tmp_path / "a" if False else tmp_path, gt)
    ev.process([{"file_name": str(tmp_path / "im.jpg")}], [{"sem_seg": _scores(np.where(gt == 255, 0, gt))}])
    assert ev.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)
    # known confusion: two class-0 pixels predicted as 1, one class-2 pixel as 0
    pred = np.array([[0, 1, 1, 1], [0, 1, 1, 1], [0, 2, 2, 0]])
    ev.reset()
    ev.process([{"file_name": str(tmp_path / "im.jpg")}], [{"sem_seg": _scores(pred)}])
    res = ev.evaluate()["sem_seg"]
    # class 0: TP 2, FP 1 (a class-2 pixel), FN 2 -> 2/5; class 1: TP 4, FP 2 -> 4/6;
    # class 2: TP 2, FN 1 -> 2/3 (the ignored pixel counts nowhere)
    iou = [2 / 5, 4 / 6, 2 / 3]
    assert res["mIoU"] == pytest.approx(100 * np.mean(iou))
    assert res["IoU-a"] == pytest.approx(40.0) and res["IoU-b"] == pytest.approx(400 / 6)
    assert res["pACC"] == pytest.approx(100 * 8 / 11)


@requires_shared
@pytest.mark.parametrize("task", ["voc_semseg_fcn_30k", "cityscapes_semseg_fcn_90k"])
def test_semseg_smoke_training_lowers_loss_and_evaluates(task, dataset_root, tmp_path):
    import json

    from tools.fixtures.cityscapes_voc import write_cityscapes, write_voc_aug
    from transfer.train_net import run

    if task.startswith("voc"):
        write_voc_aug(dataset_root)
    else:
        write_cityscapes(dataset_root, train_ids=False)  # labelIds only: mapped on the fly
    run(["--task", task, "--weights", "random", "--scale", "smoke", "--runs", str(tmp_path),
         "SOLVER.MAX_ITER", "12", "SOLVER.BASE_LR", "0.01"])
    out = os.path.join(tmp_path, f"{task}@smoke", "random", "seed0")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    miou = "sem_seg/mIoU" if task.startswith("voc") else "sem_seg/IoU"  # cityscapesscripts
    assert res["state"] == "complete" and miou in res["metrics"]
    with open(os.path.join(out, "metrics.json")) as f:
        losses = [json.loads(l)["total_loss"] for l in f if "total_loss" in l]
    assert losses[-1] < losses[0], losses
