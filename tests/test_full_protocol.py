"""Full-protocol tier: every task at the sizes its protocol uses, not at smoke scale.

For every task config in transfer/configs (a new YAML is picked up with no edit here), the task
is resolved at full scale and run as a user runs it (``python -m transfer.train_net``, in a
process of its own) with only these changes: one image per batch, one training iteration, one
PreciseBN iteration, the multi-scale training size pinned to its largest value (the protocol's
most expensive iteration), and fewer boxes through the ROI heads (64 sampled ROIs per training
image instead of 512, 100 test proposals instead of 1000): a C4 head runs res5 on every ROI, and
at 512 + 1000 ROIs one C4 task alone costs minutes of CPU. Input sizes, model and evaluator stay
the protocol's. The data are in the official formats at real image sizes (test sets of one
image; tools/fixtures/protocol.py). Each run must:
- train one iteration with finite losses on images of exactly the protocol's training size
  (ResizeShortestEdge of the real image to max(MIN_SIZE_TRAIN), capped at MAX_SIZE_TRAIN; the
  crop for semantic segmentation);
- evaluate at the protocol's test size (MIN_SIZE_TEST / MAX_SIZE_TEST; full size for semantic
  segmentation, whose predicted map must have the image's size);
- report every metric the task's results table needs (MOCO_TRANSFER.METRICS).
Tasks that resolve to the same run except for the schedule and the task's name (a 1x and its
2x) share one run: with one iteration they would run the same computation twice. The test checks
that their resolved configs agree key for key apart from those; the schedules themselves are
checked against the protocol in test_transfer_configs.py.
Pretraining gets the same: one ResNet-50 MoCo v2 step at 224 px with K=65536 and the MLP head.
"""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image
from torch.nn.modules.module import register_module_forward_pre_hook

from convert import safe_load
from tests.conftest import ROOT, SHARED_DATA, requires_shared
from transfer.config import setup_cfg
from transfer.configs import known_tasks

from detectron2.data.transforms import ResizeShortestEdge

pytestmark = requires_shared

IMS_PER_BATCH = 1
ROIS_PER_IMAGE = 64  # sampled per training image (protocol: 512)
TEST_PROPOSALS = 100  # per test image (protocol: 1000)


def tier_overrides(task, fewer_rois=True):
    """The tier's changes to the full-scale config (fewer_rois=False: the protocol's ROI
    counts, as ``make bench-tasks`` measures them)."""
    cfg = setup_cfg(task, "random")
    overrides = ["SOLVER.IMS_PER_BATCH", str(IMS_PER_BATCH), "SOLVER.MAX_ITER", "1",
                 "TEST.PRECISE_BN.NUM_ITER", "1",
                 "INPUT.MIN_SIZE_TRAIN", f"({max(cfg.INPUT.MIN_SIZE_TRAIN)},)"]
    if fewer_rois:
        overrides += ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(ROIS_PER_IMAGE),
                      "MODEL.RPN.POST_NMS_TOPK_TEST", str(TEST_PROPOSALS)]
    return overrides


@pytest.fixture(scope="module")
def protocol_root(tmp_path_factory):
    from tools.fixtures.protocol import write_protocol_datasets

    return write_protocol_datasets(SHARED_DATA, str(tmp_path_factory.mktemp("protocol_data")))


# what may differ between tasks that share a run
SCHEDULE_KEYS = (("SOLVER", "MAX_ITER"), ("SOLVER", "STEPS"), ("MOCO_TRANSFER", "TASK"),
                 ("MOCO_TRANSFER", "DESCRIPTION"), ("MOCO_TRANSFER", "PAPER_TABLE"),
                 ("OUTPUT_DIR",))


def run_key(task):
    cfg = setup_cfg(task, "random", overrides=tier_overrides(task)).clone()
    cfg.defrost()
    for key in SCHEDULE_KEYS:
        node = cfg
        for k in key[:-1]:
            node = node[k]
        node[key[-1]] = None
    return cfg.dump()


_RUNS = {}  # run key -> (task that ran, its outputs)


def run_task(task, root, runs):
    """Run the task through the probe in its own process; returns (cfg, record, results,
    first training iteration's metrics)."""
    record_path = os.path.join(runs, f"{task}.probe.json")
    cmd = [sys.executable, "-m", "transfer.protocol_probe", "--record", record_path, "--",
           "--task", task, "--weights", "random", "--runs", runs, *tier_overrides(task)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DETECTRON2_DATASETS=root),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{task} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    cfg = setup_cfg(task, "random", overrides=tier_overrides(task))
    out = os.path.join(runs, task, "random", "seed0")
    with open(record_path) as f:
        record = json.load(f)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "metrics.json")) as f:
        iterations = [json.loads(line) for line in f if '"total_loss"' in line]
    return cfg, record, results, iterations[0]


def image_size(path):
    with Image.open(path) as im:
        return im.height, im.width


def expected_size(cfg, file_name, train):
    """The (h, w) the protocol feeds the model for this image."""
    h, w = image_size(file_name)
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        return tuple(cfg.INPUT.CROP.SIZE) if train else (h, w)  # crop / full-size inference
    if train:
        short, longest = max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN
    else:
        short, longest = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    return ResizeShortestEdge.get_output_shape(h, w, short, longest)


@pytest.mark.parametrize("task", known_tasks())
def test_task_trains_and_evaluates_at_its_protocol_sizes(task, protocol_root, tmp_path):
    key = run_key(task)
    if key not in _RUNS:
        _RUNS[key] = task, run_task(task, protocol_root, str(tmp_path))
    ran, (cfg, record, results, first) = _RUNS[key]
    cfg = setup_cfg(task, "random", overrides=tier_overrides(task))  # equal but for SCHEDULE_KEYS

    # detectron2 writes each loss_* beside total_loss when a model has several (a one-loss
    # model, the FCN, writes total_loss only)
    losses = {k: v for k, v in first.items() if k.startswith("loss_") or k == "total_loss"}
    assert "total_loss" in losses and all(math.isfinite(v) for v in losses.values()), losses
    if cfg.MODEL.META_ARCHITECTURE != "SemanticSegmentor":
        assert len(losses) >= 4, losses  # RPN and box losses at least

    seen = {"train": [], "test": []}
    for fwd in record["forwards"]:
        for im in fwd["images"]:
            want = expected_size(cfg, im["file_name"], fwd["mode"] == "train")
            assert tuple(im["size"]) == tuple(want), (fwd["mode"], im, want)
            if "output_size" in im:  # semantic segmentation: one prediction per pixel
                assert tuple(im["output_size"]) == image_size(im["file_name"])
            seen[fwd["mode"]].append(im)
    assert seen["train"] and seen["test"], {k: len(v) for k, v in seen.items()}
    assert len(record["forwards"][0]["images"]) == IMS_PER_BATCH
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        assert all("output_size" in im for im in seen["test"])

    assert results["state"] == "complete"
    missing = set(cfg.MOCO_TRANSFER.METRICS) - set(results["metrics"])
    assert not missing, f"{task}: the results table needs {sorted(missing)}; got " \
                        f"{sorted(results['metrics'])}"
    assert all(isinstance(results["metrics"][k], float) for k in cfg.MOCO_TRANSFER.METRICS)
    assert results["protocol"]["scale"] == "full"


def test_pretraining_step_at_protocol_size(tmp_path):
    """One MoCo v2 step with the paper's ResNet-50, 224 px crops, K=65536 and the MLP head."""
    from pretrain import main_moco
    from pretrain.builder import MoCo

    shapes = []

    def record(module, args):
        if isinstance(module, MoCo):
            shapes.append([tuple(a.shape) for a in args[:2]])

    args = main_moco.get_args_parser().parse_args(
        ["--data", os.path.join(SHARED_DATA, "imagenet_sample", "train"), "--batch-size", "16",
         "--max-iters", "1", "--workers", "2", "--print-freq", "1",
         "--output", str(tmp_path / "pretrain")])
    handle = register_module_forward_pre_hook(record)
    try:
        ckpt_path = main_moco.main(args)
    finally:
        handle.remove()
    assert shapes == [[(16, 3, 224, 224), (16, 3, 224, 224)]]
    ckpt = safe_load.load_torch(ckpt_path)
    sd = ckpt["state_dict"]
    assert ckpt["arch"] == "resnet50"
    assert sd["module.queue"].shape == (128, 65536)
    assert sd["module.encoder_q.fc.0.weight"].shape == (2048, 2048)  # MLP: 2048-2048-ReLU-128
    assert sd["module.encoder_q.fc.2.weight"].shape == (128, 2048)
    assert int(sd["module.queue_ptr"]) == 16  # one batch of keys enqueued
    with open(tmp_path / "pretrain" / "metrics.json") as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert steps and all(math.isfinite(s["loss"]) for s in steps)


def test_protocol_task_on_two_processes(protocol_root, tmp_path):
    """coco_mask_fpn_1x at its real input sizes on 2 processes (torchrun, gloo): one training
    iteration of the global batch of 2, one image per process, each at the protocol's size;
    evaluation split over the processes (each test image once) and gathered; every metric the
    table needs, recorded with the run's layout."""
    task = "coco_mask_fpn_1x"
    overrides = tier_overrides(task)
    overrides[overrides.index("SOLVER.IMS_PER_BATCH") + 1] = "2"
    record = str(tmp_path / "probe.json")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
           "--nproc_per_node", "2", "-m", "transfer.protocol_probe", "--record", record, "--",
           "--task", task, "--weights", "random", "--runs", str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DETECTRON2_DATASETS=protocol_root),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    cfg = setup_cfg(task, "random", overrides=overrides, world_size=2)
    ranks = []
    for path in (record, record + ".rank1"):
        with open(path) as f:
            ranks.append(json.load(f))
    # each training forward (the iteration, then PreciseBN's) gets one image on each process
    train = [[fwd["images"] for fwd in r["forwards"] if fwd["mode"] == "train"] for r in ranks]
    test = [[im["file_name"] for fwd in r["forwards"] if fwd["mode"] == "test"
             for im in fwd["images"]] for r in ranks]
    for forwards in train:
        assert len(forwards) == 2 and all(len(images) == 1 for images in forwards)
        for (im,) in forwards:
            assert tuple(im["size"]) == expected_size(cfg, im["file_name"], True)
    with open(os.path.join(protocol_root, "coco", "annotations", "instances_val2017.json")) as f:
        val = sorted(im["file_name"] for im in json.load(f)["images"])
    # each test image once, on one of the processes
    assert sorted(os.path.basename(p) for p in test[0] + test[1]) == val
    with open(os.path.join(tmp_path, task, "random", "seed0", "results.json")) as f:
        results = json.load(f)
    assert results["state"] == "complete"
    assert set(cfg.MOCO_TRANSFER.METRICS) <= set(results["metrics"])
    assert results["processes"] == {"world_size": 2, "ims_per_process": 1, "device": "cpu"}
    assert results["protocol"] == {**results["protocol"], "ims_per_batch": 2, "scale": "full"}
