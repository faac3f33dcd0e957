"""DensePose: the generated DensePose-COCO fixture (official format) through loading, the
mapper, the losses, GPS on a mesh with exact geodesics, the evaluator against the official
one's numbers (densepose_golden), the legacy s1x config, training, inference and evaluation."""
import json
import logging
import math
import os
import pickle

import numpy as np
import pytest
import torch

import transfer.datasets  # noqa: F401  (registers the DensePose datasets)
from transfer.config import config_keys, setup_cfg
from tools.fixtures import densepose as fixture
from transfer.densepose import gps
from transfer.densepose.evaluation import (
    DensePoseCocoEval, encode_iuv, evaluate_densepose, gt_coco, iuv_size, resolve_geodesics,
    results_coco)
from transfer.densepose.structures import (
    MASK_LABEL_SYMMETRIES, DensePoseData, decode_part_masks)

CHART_PART = {c: p for p, c in fixture.PART_CHART.items()}
CHART_PART.update({23: 14, 24: 14})


@pytest.fixture(scope="module")
def dp_root(dataset_root):
    """The fixture written into the session's dataset root (where the datasets are registered)."""
    fixture.write_fixture(dataset_root)
    return dataset_root


def test_fixture_loads_in_the_official_format(dp_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = DatasetCatalog.get("densepose_coco_2014_train")
    assert len(dicts) == fixture.SPLITS["train"][1]
    assert MetadataCatalog.get("densepose_coco_2014_minival").evaluator_type == "densepose"
    annos = [a for d in dicts for a in d["annotations"]]
    with_dp = [a for a in annos if "dp_x" in a]
    assert 0 < len(with_dp) < len(annos)  # some people carry no DensePose annotation
    a = with_dp[0]
    assert len(a["dp_masks"]) == 14 and isinstance(a["dp_masks"][0]["counts"], str)
    assert len(a["dp_x"]) == len(a["dp_y"]) == len(a["dp_I"]) == len(a["dp_U"]) == len(a["dp_V"])
    assert max(a["dp_x"]) < 256 and set(a["dp_I"]) <= set(range(1, 25))
    np.testing.assert_array_equal(decode_part_masks(a["dp_masks"]), fixture.figure_labels())


def _mapped(dp_root, flip):
    import detectron2.data.transforms as T
    from detectron2.data import DatasetCatalog

    from transfer.densepose.data import DensePoseDatasetMapper
    from transfer.densepose.structures import load_uv_symmetries

    augs = [T.ResizeShortestEdge(400, 1000)] + ([T.RandomFlip(prob=1.0)] if flip else [])
    mapper = DensePoseDatasetMapper(
        True, augmentations=augs, image_format="RGB",
        uv_symmetries=load_uv_symmetries(
            os.path.join(dp_root, "densepose", "UV_symmetry_transforms.mat")))
    d = DatasetCatalog.get("densepose_coco_2014_train")[1]
    return d, mapper(d)


@pytest.mark.parametrize("flip", [False, True])
def test_mapper_keeps_points_and_masks_on_their_pixels(dp_root, flip):
    """After a 256 -> 400 resize (and a flip), every annotated point lands on a pixel of its
    part (the red channel encodes the part), and the part masks pasted at the new box cover
    the drawn parts."""
    d, out = _mapped(dp_root, flip)
    img = out["image"].numpy()  # RGB, CHW
    assert img.shape[1] == 400 and d["height"] == 256
    inst = out["instances"]
    n_dp = sum(x is not None for x in inst.gt_densepose.items)
    assert n_dp == sum("dp_x" in a for a in d["annotations"]) > 0
    for box, dp in zip(inst.gt_boxes.tensor.numpy(), inst.gt_densepose.items):
        if dp is None:
            continue
        x0, y0, x1, y1 = box
        px = np.floor(x0 + dp.x.numpy() / 256 * (x1 - x0)).astype(int)
        py = np.floor(y0 + dp.y.numpy() / 256 * (y1 - y0)).astype(int)
        # a flipped image shows the person's right side where its left was: the labels swap,
        # the drawn colours (the original parts) do not
        seen = MASK_LABEL_SYMMETRIES if flip else list(range(15))
        want = [fixture.part_red(seen[CHART_PART[int(c)]]) for c in dp.i]
        ok = np.abs(img[0, py, px].astype(int) - want) <= 7
        assert ok.mean() > 0.95, ok.mean()
        # masks: every pixel of the box against the label map in the box frame
        ys, xs = np.mgrid[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)]
        fx = ((xs + 0.5 - x0) / (x1 - x0) * 256).astype(int).clip(0, 255)
        fy = ((ys + 0.5 - y0) / (y1 - y0) * 256).astype(int).clip(0, 255)
        labels = dp.segm.numpy()[fy, fx]
        red = np.vectorize(lambda p: fixture.part_red(seen[p]))(labels)
        # away from part edges (resampling blurs those): the label is the same 2 px around
        inner = labels > 0
        for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)):
            inner &= labels == np.roll(labels, (dy, dx), axis=(0, 1))
        ok = np.abs(img[0, ys, xs].astype(int) - red) <= 7
        assert inner.mean() > 0.2 and ok[inner].mean() > 0.98, ok[inner].mean()
        if flip:  # the flipped point is where the figure's own (chart, U, V) says it is
            for k in range(0, len(dp.x), 7):
                x, y = float(dp.x[k]), float(dp.y[k])
                c, u, v = fixture.chart_uv(int(fixture.figure_labels()[int(y), int(x)]), x, y)
                assert int(dp.i[k]) == c
                assert float(dp.u[k]) == pytest.approx(u, abs=1.5 / 255)
                assert float(dp.v[k]) == pytest.approx(v, abs=1.5 / 255)


def test_flip_without_symmetry_file_is_disabled(dp_root, tmp_path, caplog):
    from transfer.densepose.data import DensePoseDatasetMapper

    cfg = setup_cfg("coco_densepose_fpn_s1x", "random", scale="smoke",
                    overrides=["DENSEPOSE.DATA", str(tmp_path)])
    # the handler on the logger itself: a training run earlier in this process (detectron2's
    # setup_logger for "transfer") stops propagation to the root logger caplog listens on
    log = logging.getLogger("transfer.densepose.data")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="transfer.densepose.data"):
            mapper = DensePoseDatasetMapper(cfg, True)
    finally:
        log.removeHandler(caplog.handler)
    assert "RandomFlip" not in repr(mapper.augmentations)
    assert "UV_symmetry_transforms.mat" in caplog.text
    cfg = setup_cfg("coco_densepose_fpn_s1x", "random", scale="smoke")  # fixture has it
    assert "RandomFlip" in repr(DensePoseDatasetMapper(cfg, True).augmentations)


def test_losses_against_hand_computation():
    from transfer.densepose.head import DensePoseOutput, densepose_losses

    torch.manual_seed(0)
    size = 4
    out = DensePoseOutput(torch.randn(1, 15, size, size), torch.randn(1, 25, size, size),
                          torch.rand(1, 25, size, size), torch.rand(1, 25, size, size))
    segm = np.zeros((256, 256), np.uint8)
    segm[:, :128] = 3  # left half: part 3
    # two points at the centres of grid pixels (1, 2) and (3, 0): x = (col + 0.5) * 64
    dp = DensePoseData([2.5 * 64, 0.5 * 64], [1.5 * 64, 3.5 * 64], [5, 17], [0.2, 0.9],
                       [0.4, 0.1], segm)
    box = torch.tensor([[10.0, 20.0, 110.0, 220.0]])  # proposal == person box
    losses = densepose_losses(out, box, box, [dp], 2.0, 0.3, 0.1)
    target = torch.zeros(1, size, size, dtype=torch.long)
    target[..., :2] = 3
    ce_s = -torch.log_softmax(out.coarse_segm, 1).gather(1, target[:, None]).mean()
    assert losses["loss_densepose_S"].item() == pytest.approx(2.0 * ce_s.item(), rel=1e-5)
    logp = torch.log_softmax(out.fine_segm[0], 0)
    ce_i = -(logp[5, 1, 2] + logp[17, 3, 0]) / 2
    assert losses["loss_densepose_I"].item() == pytest.approx(0.3 * ce_i.item(), rel=1e-5)

    def sl1(x):
        x = abs(x)
        return 0.5 * x * x if x < 1 else x - 0.5

    du = sl1(out.u[0, 5, 1, 2] - 0.2) + sl1(out.u[0, 17, 3, 0] - 0.9)
    dv = sl1(out.v[0, 5, 1, 2] - 0.4) + sl1(out.v[0, 17, 3, 0] - 0.1)
    assert losses["loss_densepose_U"].item() == pytest.approx(0.1 * float(du), rel=1e-5)
    assert losses["loss_densepose_V"].item() == pytest.approx(0.1 * float(dv), rel=1e-5)
    # a proposal a quarter box to the right: grid centres at x = 47.5, 72.5, 97.5, 122.5, i.e.
    # frame x 96, 160, 224 and outside; the second point (x 22.5) falls outside the proposal
    from transfer.densepose.head import densepose_targets

    shifted = box + torch.tensor([[25.0, 0, 25.0, 0]])
    t_segm, roi, fx, fy, i, _, _ = densepose_targets(shifted, box, [dp], size)
    assert t_segm[0, :, 0].eq(3).all() and t_segm[0, :, 1:].eq(0).all()
    assert i.tolist() == [5] and roi.tolist() == [0]
    assert fx.item() == pytest.approx(1.0) and fy.item() == pytest.approx(1.0)


def test_training_step_with_images_without_densepose(dp_root):
    """A batch where one image has no annotated person, then one where none has: the pooler
    still gets one box list per image, and the DensePose losses are zero but reach the head."""
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from transfer.densepose.data import DensePoseDatasetMapper
    from transfer.densepose.structures import DensePoseList
    from transfer.trainer import Trainer

    cfg = setup_cfg("coco_densepose_fpn_s1x", "random", scale="smoke")
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    mapper = DensePoseDatasetMapper(cfg, True)
    batch = [mapper(d) for d in DatasetCatalog.get("densepose_coco_2014_train")[:2]]
    inst = batch[1]["instances"]
    inst.gt_densepose = DensePoseList([None] * len(inst))
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_densepose_U"] > 0
    inst = batch[0]["instances"]
    inst.gt_densepose = DensePoseList([None] * len(inst))
    with EventStorage():
        losses = model(batch)
    assert losses["loss_densepose_S"] == 0 and losses["loss_densepose_U"] == 0
    sum(losses.values()).backward()
    grad = model.roi_heads.densepose_head.predictors["u"].weight.grad
    assert grad is not None and torch.isfinite(grad).all()


# ---------------------------------------------------------------- GPS
# grid_surface: charts side by side, each a 0.1 x 0.1 square; vertices at U, V in {0, .5, 1}
W_CHART = 0.1


@pytest.fixture(scope="module")
def surface(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smpl")
    gps.write_official_surface(str(folder), *gps.grid_surface(steps=3, chart_width=W_CHART))
    return gps.load_official_surface(str(folder))


# the official evaluator's kappa per chart (densepose_golden/README.md, written out here)
KAPPA = {1: 0.351, 2: 0.351, 3: 0.107, 4: 0.107, 5: 0.126, 6: 0.126}
KAPPA.update({c: 0.237 for c in range(7, 11)})
KAPPA.update({c: 0.173 for c in range(11, 15)})
KAPPA.update({c: 0.142 for c in range(15, 19)})
KAPPA.update({c: 0.128 for c in range(19, 23)})
KAPPA.update({23: 0.150, 24: 0.150})


def test_gps_geodesics_on_the_test_mesh(surface):
    v = surface.vertices([1, 1, 2, 0, 1], [0.4, 1.0, 0.0, 0.5, 0.25], [0.1, 0.0, 0.0, 0.5, 0.0])
    assert v[3] == -1
    assert surface.part_ids[v[0]] == 1 and tuple(surface.uv[v[0]]) == (0.5, 0.0)
    assert tuple(surface.uv[v[4]]) == (0.0, 0.0)  # a tie between U 0 and 0.5: the first vertex
    d = surface.geodesics(v[[0, 1, 0, 0]], v[[1, 2, 0, 3]])
    # (1, .5, 0) -> (1, 1, 0): 0.05; (1, 1, 0) and (2, 0, 0) are the same place: 0
    np.testing.assert_allclose(d, [0.05, 0.0, 0.0, np.inf], atol=1e-12)
    # kappa by the annotated point's chart: torso (chart 1) 0.351, hand (chart 3) 0.107
    g = gps.gps(surface, ([1, 3], [0.0, 0.5], [0.0, 0.5]), ([2, 4], [0.0, 0.5], [0.0, 0.5]))
    assert g == pytest.approx((math.exp(-W_CHART ** 2 / (2 * 0.351 ** 2))
                               + math.exp(-W_CHART ** 2 / (2 * 0.107 ** 2))) / 2)
    assert gps.gps(surface, ([1, 3], [0.0, 0.5], [0.0, 0.5]), ([0, 0], [0, 0], [0, 0])) == 0


BOX = [10.0, 20.0, 100.0, 200.0]


def _gt_dataset():
    pts = [(x, y) for x in (20.0, 80.0, 140.0, 200.0) for y in (30.0, 110.0, 190.0)]  # 12
    xs, ys = map(list, zip(*pts))
    charts = [1 + (k % 20) for k in range(12)]
    us = [[0.0, 0.5, 1.0][k % 3] for k in range(12)]
    vs = [[0.5, 1.0, 0.0][k % 3] for k in range(12)]
    people = [dict(id=1, image_id=1, category_id=1, iscrowd=0, bbox=BOX, area=BOX[2] * BOX[3],
                   dp_x=xs, dp_y=ys, dp_I=charts, dp_U=us, dp_V=vs),
              # a person without points: an ignore region
              dict(id=2, image_id=1, category_id=1, iscrowd=0, bbox=[150.0, 30.0, 60.0, 150.0],
                   area=9000.0)]
    return {"images": [{"id": 1, "width": 320, "height": 240, "file_name": "a.jpg"}],
            "categories": [{"id": 1, "name": "person"}], "annotations": people}


def _prediction(dataset, chart_shift=0, background_every=0, box=BOX, score=0.9):
    """An IUV image for `box` holding person 1's (chart + shift, U, V) at the pixels where the
    evaluator reads its points: column int(x0 + dp_x * w / 255 - box x), row alike."""
    gt = dataset["annotations"][0]
    h, w = iuv_size(box)
    iuv = np.zeros((3, h, w), np.uint8)
    for k, (x, y) in enumerate(zip(gt["dp_x"], gt["dp_y"])):
        c = int(x * BOX[2] / 255 + BOX[0] - box[0])
        r = int(y * BOX[3] / 255 + BOX[1] - box[1])
        if (background_every and k % background_every == 0) or not (0 <= c < w and 0 <= r < h):
            continue
        iuv[:, r, c] = [gt["dp_I"][k] + chart_shift, round(gt["dp_U"][k] * 255),
                        round(gt["dp_V"][k] * 255)]
    return {"image_id": 1, "category_id": 1, "bbox": list(box), "score": score,
            "densepose": encode_iuv(iuv)}


def _ap_of_one_match(g):
    """AP (%) of one detection matched to the only person with pair score g."""
    return 100 * np.mean([t <= g for t in np.linspace(0.5, 0.95, 10)])


def test_gps_ap_perfect_shifted_and_partial(surface):
    data = _gt_dataset()
    # a detection on the person without points: box IoU 1 >= 0.8 there, so it is ignored
    on_ignored = _prediction(data, box=[150.0, 30.0, 60.0, 150.0], score=0.95)
    res = evaluate_densepose(data, [_prediction(data), on_ignored], surface)
    perfect = res["densepose"]
    assert perfect["AP"] == pytest.approx(100) and perfect["AP75"] == pytest.approx(100)
    assert np.isnan(perfect["APm"]) and perfect["APl"] == pytest.approx(100)  # no medium person
    # GPSM: the predicted body is the 12 point pixels, the person has no part masks: IoU 0
    assert res["densepose_gpsm"]["AP"] == 0
    # every point on the neighbouring chart: geodesic 0.1, kappa by the annotated chart
    charts = data["annotations"][0]["dp_I"]
    g = np.mean([math.exp(-W_CHART ** 2 / (2 * KAPPA[c] ** 2)) for c in charts])
    assert 0.75 < g < 0.9
    shifted = evaluate_densepose(data, [_prediction(data, chart_shift=1)], surface)["densepose"]
    assert shifted["AP"] == pytest.approx(_ap_of_one_match(g))
    assert shifted["AP50"] == pytest.approx(100) and shifted["AP75"] == pytest.approx(100)
    # a third of the points predicted as background: GPS 2/3 -> thresholds 0.50 .. 0.65
    part = evaluate_densepose(data, [_prediction(data, background_every=3)], surface)["densepose"]
    assert part["AP"] == pytest.approx(40) and part["AP50"] == pytest.approx(100)
    assert part["AP75"] == pytest.approx(0)


def test_without_geodesic_data_gps_is_skipped_with_a_reason(tmp_path):
    surface, reason = resolve_geodesics(str(tmp_path))
    assert surface is None and "Pdist_matrix.pkl" in reason and "DENSEPOSE.DATA" in reason
    data = _gt_dataset()
    res = evaluate_densepose(data, [_prediction(data)], None)
    # box AP counts every person (two, one detected): precision 1 up to recall 0.5 -> 51/101
    assert "densepose" not in res and res["bbox"]["AP"] == pytest.approx(100 * 51 / 101)


# ---------------------------------------------------------------- the official evaluator's numbers
# ../shared/reference/densepose_golden: ground truth, a test surface in the official layout,
# prediction sets and the numbers detectron2's DensePoseCocoEval (commit 02b5c4e2) gives them
GOLDEN = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                      "reference", "densepose_golden"))
requires_golden = pytest.mark.skipif(
    not os.path.isdir(GOLDEN), reason=f"needs the official evaluator's numbers in {GOLDEN}")


def _golden_expected():
    with open(os.path.join(GOLDEN, "expected.json")) as f:
        return json.load(f)


def _golden_case(name):
    """gt.json and a case's detections as the harness saves them (compact IUV)."""
    with open(os.path.join(GOLDEN, "gt.json")) as f:
        dataset = json.load(f)
    with open(os.path.join(GOLDEN, "cases", f"{name}.json")) as f:
        case = json.load(f)
    arrays = np.load(os.path.join(GOLDEN, "cases", f"{name}.npz"))
    predictions = []
    for d in case["detections"]:
        iuv = arrays[d["iuv"]]
        assert iuv.shape[1:] == iuv_size(d["bbox"])  # the harness's IUV size convention
        predictions.append(dict({k: d[k] for k in ("image_id", "category_id", "bbox", "score")},
                                densepose=encode_iuv(iuv)))
    return dataset, predictions


@pytest.fixture(scope="module")
def golden_surface():
    return gps.load_official_surface(os.path.join(GOLDEN, "surface"))


GOLDEN_CASES = sorted(_golden_expected()["cases"]) if os.path.isdir(GOLDEN) else []


@requires_golden
def test_evaluator_agrees_with_the_official_one_on_every_golden_case(golden_surface):
    """GPS (the published APdp) and GPSM: AP, AP50, AP75, APm, APl within 0.05 of the official
    evaluator, through the harness's own evaluation (evaluate_densepose)."""
    expected = _golden_expected()["cases"]
    assert len(GOLDEN_CASES) == 12
    for name in GOLDEN_CASES:
        dataset, predictions = _golden_case(name)
        assert len(predictions) == expected[name]["n_detections"]
        res = evaluate_densepose(dataset, predictions, golden_surface)
        for key, mode in (("densepose", "GPS"), ("densepose_gpsm", "GPSM")):
            for metric, want in expected[name][mode].items():
                assert res[key][metric] == pytest.approx(want, abs=0.05), (name, mode, metric)


@requires_golden
@pytest.mark.parametrize("name", ["perfect", "lr_swap_50", "subpixel_stripes"])
def test_pair_scores_equal_the_official_ones(golden_surface, name):
    """Per (detection, person): GPS and body-mask IoU to the official evaluator's 6 decimals."""
    want = _golden_expected()["pair_matrices"][name]
    dataset, predictions = _golden_case(name)
    ev = DensePoseCocoEval(gt_coco(dataset), results_coco(dataset, predictions),
                           golden_surface)
    ev.params.imgIds = sorted(ev.cocoGt.getImgIds())
    ev._prepare()
    pairs = ev.pair_scores(want["image_id"], 1)
    dets = ev._top_detections(ev._dts[want["image_id"], 1], 20)
    assert [d["id"] - 1 for d in dets] == want["rows_detection_index"]
    assert [g["id"] for g in ev._gts[want["image_id"], 1]] == want["columns_annotation_id"]
    np.testing.assert_allclose(pairs["gps"], want["gps"], atol=1.5e-6)
    np.testing.assert_allclose(pairs["mask_iou"], want["mask_iou"], atol=1.5e-6)


@requires_golden
def test_fixture_surface_files_have_the_official_layout(tmp_path):
    """The writer's three files against the golden surface/ (the official layout): the same
    variables with the same dtypes and shape pattern (1 x N, N x 1, (K, 1) in a dict)."""
    from scipy.io import loadmat

    fixture.write_fixture(str(tmp_path))
    ours, official = os.path.join(str(tmp_path), "densepose"), os.path.join(GOLDEN, "surface")
    n = 24 * 5 * 5  # fixture surface: 5 x 5 vertices per chart
    for name in ("SMPL_subdiv.mat", "SMPL_SUBDIV_TRANSFORM.mat"):
        a, b = loadmat(os.path.join(ours, name)), loadmat(os.path.join(official, name))
        keys = sorted(k for k in b if not k.startswith("__"))
        assert sorted(k for k in a if not k.startswith("__")) == keys
        for k in keys:
            assert a[k].dtype == b[k].dtype, (name, k)
            assert a[k].shape == tuple(n if s == 600 else s for s in b[k].shape), (name, k)
    part_ids = loadmat(os.path.join(ours, "SMPL_subdiv.mat"))["Part_ID_subdiv"]
    assert part_ids.dtype == np.int32 and sorted(set(part_ids.ravel())) == list(range(1, 25))
    tables = []
    for folder in (ours, official):
        with open(os.path.join(folder, "Pdist_matrix.pkl"), "rb") as f:
            tables.append(pickle.load(f, encoding="latin1"))
    assert sorted(tables[0]) == sorted(tables[1]) == ["Pdist_matrix"]
    a, b = tables[0]["Pdist_matrix"], tables[1]["Pdist_matrix"]
    assert a.dtype == b.dtype == np.float64 and a.shape == (n * (n - 1) // 2, 1) and b.ndim == 2
    # and the official indexing works on it: Part_ID_subdiv indexes arrays as integers
    surface = gps.load_official_surface(ours)
    assert np.arange(25)[part_ids.squeeze()].tolist() == part_ids.ravel().tolist()
    v = surface.vertices([2, 2], [0.0, 1.0], [0.0, 0.0])
    assert surface.geodesics(v[:1], v[1:])[0] == pytest.approx(0.1)  # grid_surface: w 0.1


# ---------------------------------------------------------------- the legacy s1x config
# detectron2 v0.6 projects/DensePose/configs, as published (recalled; no network to re-check):
# Base-DensePose-RCNN-FPN.yaml, densepose_rcnn_R_50_FPN_s1x_legacy.yaml on top of it, and the
# DensePose head defaults it inherits. Keys it does not set are detectron2's defaults.
LEGACY_S1X = {
    # Base-DensePose-RCNN-FPN.yaml
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.DENSEPOSE_ON": True,
    "MODEL.ROI_HEADS.NAME": "DensePoseROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_HEADS.NUM_CLASSES": 1,
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 2,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlign",
    "MODEL.ROI_DENSEPOSE_HEAD.NAME": "DensePoseV1ConvXHead",
    "MODEL.ROI_DENSEPOSE_HEAD.POOLER_TYPE": "ROIAlign",
    "DATASETS.TRAIN": ["densepose_coco_2014_train", "densepose_coco_2014_valminusminival"],
    "DATASETS.TEST": ["densepose_coco_2014_minival"],
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.WARMUP_FACTOR": 0.1,
    "INPUT.MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800],
    # densepose_rcnn_R_50_FPN_s1x_legacy.yaml
    "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.ROI_DENSEPOSE_HEAD.NUM_COARSE_SEGM_CHANNELS": 15,
    "MODEL.ROI_DENSEPOSE_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_DENSEPOSE_HEAD.HEATMAP_SIZE": 56,
    "MODEL.ROI_DENSEPOSE_HEAD.INDEX_WEIGHTS": 2.0,
    "MODEL.ROI_DENSEPOSE_HEAD.PART_WEIGHTS": 0.3,
    "MODEL.ROI_DENSEPOSE_HEAD.POINT_REGRESSION_WEIGHTS": 0.1,
    "MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON": False,
    "SOLVER.BASE_LR": 0.002,
    "SOLVER.MAX_ITER": 130000,
    "SOLVER.STEPS": [100000, 120000],
    # DensePose head defaults it inherits
    "MODEL.ROI_DENSEPOSE_HEAD.NUM_STACKED_CONVS": 8,
    "MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_DIM": 512,
    "MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_KERNEL": 3,
    "MODEL.ROI_DENSEPOSE_HEAD.DECONV_KERNEL": 4,
    "MODEL.ROI_DENSEPOSE_HEAD.UP_SCALE": 2,
    "MODEL.ROI_DENSEPOSE_HEAD.NUM_PATCHES": 24,
    "MODEL.ROI_DENSEPOSE_HEAD.POOLER_SAMPLING_RATIO": 2,
    "MODEL.ROI_DENSEPOSE_HEAD.FG_IOU_THRESHOLD": 0.7,  # selection iou > threshold (strict)
}
# the only allowed differences: the MoCo protocol's (PROTOCOL.md section 3) ...
PROTOCOL_DIFFERENCES = {
    "MODEL.RESNETS.NORM": "naiveSyncBN", "MODEL.FPN.NORM": "naiveSyncBN",  # BN trained, synced
    "MODEL.BACKBONE.FREEZE_AT": 0, "TEST.PRECISE_BN.ENABLED": True,
    # normalisation follows the weights; no MODEL.WEIGHTS of its own (the run's weights)
    "MODEL.PIXEL_MEAN": None, "MODEL.PIXEL_STD": None, "INPUT.FORMAT": None,
    "MODEL.RESNETS.STRIDE_IN_1X1": None, "MODEL.WEIGHTS": None,
}
# ... and the run's own bookkeeping (not model settings)
RUN_KEYS = ("OUTPUT_DIR", "SEED", "MODEL.DEVICE")


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_densepose_config_equals_the_legacy_s1x_config_key_for_key():
    from detectron2.config import get_cfg as d2_get_cfg

    def at(cfg, key):
        for part in key.split("."):
            cfg = cfg[part]
        return _plain(cfg)

    defaults = d2_get_cfg()
    for weights in ("random", "supervised"):
        cfg = setup_cfg("coco_densepose_fpn_s1x", weights)
        keys = set(config_keys(defaults)) | set(LEGACY_S1X)
        compared = 0
        for key in sorted(keys - set(RUN_KEYS)):
            want = LEGACY_S1X[key] if key in LEGACY_S1X else at(defaults, key)
            if key in PROTOCOL_DIFFERENCES:
                if PROTOCOL_DIFFERENCES[key] is not None:
                    assert at(cfg, key) == PROTOCOL_DIFFERENCES[key], key
                continue
            assert at(cfg, key) == want, (weights, key, at(cfg, key), want)
            compared += 1
        assert compared > 150  # every detectron2 key and every legacy key
        head = {k for k in config_keys(cfg) if k.startswith("MODEL.ROI_DENSEPOSE_HEAD.")}
        assert head == {k for k in LEGACY_S1X if k.startswith("MODEL.ROI_DENSEPOSE_HEAD.")}
    assert "KAPPA" not in cfg.DENSEPOSE  # GPS normalises per body part, no constant to set
    assert {"densepose/AP", "densepose/AP50", "densepose/AP75", "densepose_gpsm/AP"} <= set(
        cfg.MOCO_TRANSFER.METRICS)


def test_densepose_proposals_need_iou_strictly_above_the_threshold():
    from detectron2.structures import Boxes, Instances

    from transfer.densepose.head import densepose_proposals
    from transfer.densepose.structures import DensePoseList

    segm = np.zeros((256, 256), np.uint8)
    dp = DensePoseData([1.0], [1.0], [1], [0.5], [0.5], segm)
    p = Instances((100, 100))
    # IoU with the person [0, 0, 10, 10]: 0.7 exactly, 0.71, 0.9, and 1 without DensePose data
    p.proposal_boxes = Boxes(torch.tensor([[0, 0, 7, 10], [0, 0, 7.1, 10], [0, 0, 9, 10],
                                           [0, 0, 10, 10.0]]))
    p.gt_boxes = Boxes(torch.tensor([[0, 0, 10, 10.0]] * 4))
    p.gt_classes = torch.zeros(4, dtype=torch.long)
    p.gt_densepose = DensePoseList([dp, dp, dp, None])
    empty = p[:0]
    picked = densepose_proposals([p, empty], 1, 0.7)
    assert len(picked) == 2 and len(picked[1]) == 0
    assert picked[0].proposal_boxes.tensor[:, 2].tolist() == pytest.approx([7.1, 9.0])


# ---------------------------------------------------------------- end to end
def test_densepose_smoke_training_lowers_loss_infers_and_evaluates(dp_root, tmp_path):
    from transfer.densepose.evaluation import decode_iuv
    from transfer.train_net import run

    task = "coco_densepose_fpn_s1x"
    run(["--task", task, "--weights", "random", "--scale", "smoke", "--runs", str(tmp_path),
         "SOLVER.MAX_ITER", "20", "SOLVER.BASE_LR", "0.001"])
    out = os.path.join(tmp_path, f"{task}@smoke", "random", "seed0")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["state"] == "complete"
    for key in ("densepose/AP", "densepose/AP50", "densepose/AP75", "bbox/AP", "segm/AP",
                "densepose_gpsm/AP"):
        assert key in res["metrics"]
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if "total_loss" in line]
    for key in ("total_loss", "loss_densepose_S", "loss_densepose_U"):
        values = [r[key] for r in rows]
        assert all(np.isfinite(values)) and np.mean(values[-3:]) < np.mean(values[:3]), key
    with open(os.path.join(out, "inference", "densepose_coco_2014_minival",
                           "densepose_results.json")) as f:
        dets = json.load(f)
    assert dets
    for det in dets[:5]:
        iuv = decode_iuv(det["densepose"])
        assert iuv.shape == (3,) + iuv_size(det["bbox"])
        assert iuv[0].max() <= 24
    # the reported AP is the evaluator's on the saved results
    with open(os.path.join(dp_root, "coco", "annotations", "densepose_minival2014.json")) as f:
        dataset = json.load(f)
    surface, _ = resolve_geodesics(os.path.join(dp_root, "densepose"))
    again = evaluate_densepose(dataset, dets, surface)
    assert set(again) == {"bbox", "segm", "densepose", "densepose_gpsm"}
    for group, values in again.items():
        for name, value in values.items():
            assert res["metrics"][f"{group}/{name}"] == pytest.approx(value, abs=1e-9,
                                                                       nan_ok=True), name


def test_densepose_reported_metrics_are_the_evaluators_on_non_trivial_detections(
        dp_root, tmp_path, monkeypatch):
    """The smoke run above detects little (AP near 0), which a scaled or swapped metric would not
    change. Here an evaluation-only run's model is given jittered ground-truth boxes with random
    scores, and false positives (its heads predict masks and IUV for them): every reported
    metric must be the evaluator's on the results it saved, with box AP strictly inside
    (0, 100)."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.structures import Boxes, Instances

    from transfer.train_net import run

    task = "coco_densepose_fpn_s1x"
    records = {r["image_id"]: r for r in DatasetCatalog.get("densepose_coco_2014_minival")}
    rng = np.random.default_rng(0)
    inference = GeneralizedRCNN.inference

    def given_boxes(self, batched_inputs, detected_instances=None, do_postprocess=True):
        given = []
        for x in batched_inputs:
            r = records[x["image_id"]]
            scale = x["image"].shape[-2] / r["height"]
            boxes = [[bx, by, bx + bw, by + bh] for bx, by, bw, bh in
                     (a["bbox"] for a in r["annotations"] if not a.get("iscrowd", 0))]
            boxes = np.array(boxes + [[0, 0, r["width"] / 3, r["height"] / 3]], np.float32)
            boxes = (boxes + rng.uniform(-4, 4, boxes.shape)) * scale
            given.append(Instances(
                tuple(x["image"].shape[-2:]), pred_boxes=Boxes(torch.tensor(boxes)),
                scores=torch.tensor(rng.uniform(0.1, 1, len(boxes)), dtype=torch.float32),
                pred_classes=torch.zeros(len(boxes), dtype=torch.int64)))
        return inference(self, batched_inputs, given, do_postprocess)

    monkeypatch.setattr(GeneralizedRCNN, "inference", given_boxes)
    run(["--task", task, "--weights", "random", "--scale", "smoke", "--runs", str(tmp_path),
         "--eval-only"])
    out = os.path.join(tmp_path, f"{task}@smoke", "random", "seed0")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "inference", "densepose_coco_2014_minival",
                           "densepose_results.json")) as f:
        dets = json.load(f)
    assert len(dets) == sum(1 + sum(not a.get("iscrowd", 0) for a in r["annotations"])
                            for r in records.values())
    with open(os.path.join(dp_root, "coco", "annotations", "densepose_minival2014.json")) as f:
        dataset = json.load(f)
    surface, _ = resolve_geodesics(os.path.join(dp_root, "densepose"))
    again = evaluate_densepose(dataset, dets, surface)
    assert set(again) == {"bbox", "segm", "densepose", "densepose_gpsm"}
    assert 10 < again["bbox"]["AP"] < 100, again["bbox"]
    flat = {f"{group}/{name}": value for group, values in again.items()
            for name, value in values.items()}
    assert set(res["metrics"]) == set(flat)
    for key, value in flat.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-9, nan_ok=True), key
