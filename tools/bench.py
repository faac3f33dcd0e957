"""`make bench`: MoCo step and data throughput, harness overhead, converter, results and COCO
evaluation timings.

Results are appended to one Markdown file (default BENCHMARKS.md) under a heading naming the
machine (CPU model, cores, GPU, torch version), so figures from different machines never mix.

    python -m tools.bench [--out BENCHMARKS.md]
    python -m tools.bench [--out BENCHMARKS.md]
        [--only pretrain,mechanisms,data,augment,harness,convert,results]
    python -m tools.bench --only coco_eval [--eval-images 2000]   # COCO evaluation speed
(coco_eval: 2000 images by default, as pycocotools needs about 7 minutes for COCO val's 5000 on
a 2-core machine; `--eval-images 5000` for the full size.)
"""
import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from convert.to_detectron2 import convert
from pretrain import engine, loader, main_moco
from pretrain.builder import MoCo
from pretrain.synthetic import generate
from results.__main__ import main as results_main
from transfer.datasets import dataset_root
from transfer.fast_eval import FasterCOCOeval
from tools import bench_augment
from tools.bench_mechanisms import section as mechanisms_section
from tools.benchmarking import machine, publish


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def moco_step_bench(device, precision, steps, batch, splits, seed=0):
    """img/s of the MoCo training step (query fwd+bwd, key fwd, queue) and its loss curve."""
    _, dtype, use_scaler, channels_last = engine.resolve_precision(precision, device)
    torch.manual_seed(seed)
    model = MoCo(torchvision.models.resnet50, K=4096, m=0.999, T=0.2, mlp=True,
                 num_splits=splits).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, 3, 224, 224, generator=g), torch.randn(batch, 3, 224, 224,
                                                                        generator=g))
            for _ in range(2)]
    losses, times = [], []
    criterion = torch.nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        q, k = data[i % 2]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _, _ = main_moco.train_step(model, criterion, opt, scaler, q, k, device, dtype,
                                          channels_last, torch.Generator().manual_seed(i))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    mem = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb())
    return batch / statistics.median(times), losses, mem


def bench_pretrain(lines, steps):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = 64 if device.type == "cuda" else 32
    default = "auto"
    fast, fast_losses, fast_mem = moco_step_bench(device, default, steps, batch, 8)
    plain, plain_losses, plain_mem = moco_step_bench(device, "fp32", steps, batch, 8)
    resolved = engine.resolve_precision(default, device)
    lines += [
        f"### MoCo v2 ResNet-50 training step, 224 px, batch {batch}, {device.type}",
        "",
        "| step | img/s | peak memory (MB) |",
        "|---|---|---|",
        f"| default ({resolved[0]}, channels_last={resolved[3]}) | {fast:.1f} | {fast_mem:.0f} |",
        f"| plain fp32, contiguous | {plain:.1f} | {plain_mem:.0f} |",
        "",
        f"Speed-up of the default step: **{fast / plain:.2f}x** (median of {steps} steps after "
        "one warm-up, same data and init).",
        "",
        "Loss per step (same init, same two alternating batches):",
        "",
        "| step | " + " | ".join(str(i) for i in range(len(fast_losses))) + " |",
        "|---|" + "---|" * len(fast_losses),
        "| default | " + " | ".join(f"{v:.3f}" for v in fast_losses) + " |",
        "| fp32 | " + " | ".join(f"{v:.3f}" for v in plain_losses) + " |",
        "| abs diff | " + " | ".join(f"{abs(a - b):.3f}" for a, b in zip(fast_losses,
                                                                       plain_losses)) + " |",
        "",
    ]


def bench_data(lines, n_images=64):

    root = generate(os.path.join(tempfile.gettempdir(), "moco-bench-data"), n_unlabeled=n_images,
                    n_labeled_per_class=1, n_train=1, n_val=1, size=256, quiet=True)
    ds = loader.ImageFiles(os.path.join(root, "unlabeled"),
                           loader.TwoCropsTransform(loader.moco_augmentation("v2", 224)), seed=0)
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    per_worker = len(ds) / (time.perf_counter() - t)
    lines += [
        "### Data pipeline (MoCo v2 aug+, two 224 px crops of 256 px JPEG scenes)",
        "",
        f"{per_worker:.1f} images/s per worker process (both crops; ImageNet JPEGs are larger, "
        "about 400x350, so expect somewhat less).",
        "",
    ]
    return per_worker


def bench_harness(lines, iters):
    """Per-iteration time of the harness's Trainer vs a plain detectron2 training loop on the
    same resolved config (VOC-sized synthetic images)."""
    code = r"""
import sys, time, torch, json
from transfer.config import setup_cfg
from transfer.trainer import Trainer
from detectron2.engine import DefaultTrainer
from detectron2.utils.events import EventStorage
import transfer.datasets
which, iters = sys.argv[1], int(sys.argv[2])
cfg = setup_cfg("synthetic_mask_fpn_1k", "random", scale="smoke",
                overrides=["SOLVER.MAX_ITER", str(iters + 5), "OUTPUT_DIR", sys.argv[3],
                           "TEST.PRECISE_BN.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0"])
torch.manual_seed(0)
loop = Trainer(cfg) if which == "harness" else DefaultTrainer(cfg)
times = []
with EventStorage(0) as s:
    loop.storage = s
    for i in range(iters + 5):
        loop.iter = i
        t0 = time.perf_counter(); loop.run_step(); times.append(time.perf_counter() - t0)
        s.iter = i
times = sorted(times[5:])
print(json.dumps(times[len(times) // 2]))
"""

    generate(os.path.join(dataset_root(), "synthetic"), quiet=True)
    res = {"harness": [], "plain": []}
    for which in ("harness", "plain", "plain", "harness"):  # alternate: drift cancels out
        with tempfile.TemporaryDirectory() as d:
            out = subprocess.run([sys.executable, "-c", code, which, str(iters), d],
                                 capture_output=True, text=True, check=True)
            res[which].append(float(out.stdout.strip().splitlines()[-1]))
    spread = max(abs(a - b) / min(a, b) for a, b in res.values())
    res = {k: statistics.mean(v) for k, v in res.items()}
    lines += [
        "### Harness overhead (synthetic_mask_fpn_1k, smoke scale, one process)",
        "",
        f"median step: harness Trainer {res['harness'] * 1000:.0f} ms, plain detectron2 "
        f"DefaultTrainer {res['plain'] * 1000:.0f} ms, ratio **{res['harness'] / res['plain']:.3f}**"
        f" (each the mean of 2 processes of {iters} timed iterations after 5 warm-up, run "
        f"alternately; the same variant differed by up to {spread * 100:.0f}% between its two "
        "processes, the noise floor here).",
        "",
    ]


def bench_results(lines, seeds=5):
    """Time `make results` on a generated tree: 2 tasks x 3 weights x `seeds` runs."""
    import json


    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        for task in ("voc_frcnn_c4_24k", "coco_mask_fpn_2x"):
            for w in ("random", "supervised", "moco"):
                for seed in range(seeds):
                    run = os.path.join(d, "runs", task, w, f"seed{seed}")
                    os.makedirs(run)
                    metrics = {m: float(torch.rand(1, generator=g)) * 100 for m in
                               ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP")}
                    rec = {"state": "complete", "metrics": metrics, "protocol": {}}
                    with open(os.path.join(run, "results.json"), "w") as f:
                        json.dump(rec, f)
        t = time.perf_counter()
        results_main(["--runs", os.path.join(d, "runs"), "--out", os.path.join(d, "out")])
        took = time.perf_counter() - t
    lines += [f"### Results: {2 * 3 * seeds} runs -> tables, plots, HTML: {took:.2f} s", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--only",
                   default="pretrain,mechanisms,data,augment,harness,convert,results,coco_eval")
    p.add_argument("--steps", type=int, default=6, help="timed MoCo steps per variant")
    p.add_argument("--harness-iters", type=int, default=20)
    p.add_argument("--eval-images", type=int, default=2000,
                   help="generated images for the coco_eval section (100 detections each; "
                        "COCO val has 5000)")
    args = p.parse_args(argv)
    which = set(args.only.split(","))
    lines = [f"## {machine()}", "",
             f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} with "
             f"`python -m tools.bench --only {args.only}`.", ""]
    if "pretrain" in which:
        bench_pretrain(lines, args.steps)
    if "mechanisms" in which:  # moco, end-to-end, memory bank, MoCHi: tools/bench_mechanisms.py
        lines += mechanisms_section(4, 32 if not torch.cuda.is_available() else 64, 8)
    if "data" in which:
        bench_data(lines)
    if "augment" in which:  # the split augmentation against the PIL path (tools/bench_augment)
        bench_augment.bench_speed(lines, torch.device("cpu"), images=200)
    if "harness" in which:
        bench_harness(lines, args.harness_iters)
    if "convert" in which:
        bench_convert(lines)
    if "results" in which:
        bench_results(lines)
    if "coco_eval" in which:
        bench_coco_eval(lines, args.eval_images)
    publish(args.out, "\n".join(lines) + "\n", "bench")
    return 0


def bench_convert(lines):

    with tempfile.TemporaryDirectory() as d:
        sd = torchvision.models.resnet50().state_dict()
        path = os.path.join(d, "m.pth.tar")
        torch.save({"arch": "resnet50", "state_dict": {
            **{f"module.encoder_q.{k}": v for k, v in sd.items()},
            **{f"module.encoder_k.{k}": v for k, v in sd.items()}}}, path)
        t = time.perf_counter()
        convert(path)
        conv = time.perf_counter() - t
    lines += [f"### Converter: MoCo ResNet-50 checkpoint (q+k encoders) -> detectron2: "
              f"{conv:.2f} s", ""]


def coco_eval_data(images, dets_per_image=100, seed=0):
    """A generated COCO val set (80 classes, 1-14 boxes per 640x480 image) and detections:
    per image `dets_per_image` boxes, jittered copies of its objects (some with a wrong class)
    and random boxes, with random scores. Returns (ground-truth dataset dict, results list)."""
    rng = np.random.default_rng(seed)
    W, H = 640, 480
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)}
                                                         for c in range(1, 81)]}
    results = []
    for img_id in range(1, images + 1):
        gt["images"].append({"id": img_id, "width": W, "height": H})
        n = int(rng.integers(1, 15))
        wh = rng.uniform(8, 300, (n, 2))
        xy = rng.uniform(0, 1, (n, 2)) * ([W, H] - wh)
        cats = rng.integers(1, 81, n)
        for k in range(n):
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": img_id,
                "category_id": int(cats[k]), "bbox": [*xy[k], *wh[k]],
                "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": 0})
        near = dets_per_image * 3 // 4  # around the objects; the rest anywhere
        src = rng.integers(0, n, near)
        d_wh = np.maximum(wh[src] * rng.normal(1, 0.15, (near, 2)), 2)
        d_xy = xy[src] + rng.normal(0, 0.1, (near, 2)) * wh[src]
        d_cat = np.where(rng.random(near) < 0.8, cats[src], rng.integers(1, 81, near))
        r_wh = rng.uniform(8, 300, (dets_per_image - near, 2))
        r_xy = rng.uniform(0, 1, (dets_per_image - near, 2)) * ([W, H] - r_wh)
        boxes = np.r_[np.c_[d_xy, d_wh], np.c_[r_xy, r_wh]]
        labels = np.r_[d_cat, rng.integers(1, 81, dets_per_image - near)]
        for box, cat, score in zip(boxes.tolist(), labels.tolist(), rng.random(dets_per_image)):
            results.append({"image_id": img_id, "category_id": cat, "bbox": box,
                            "score": float(score)})
    return gt, results


def bench_coco_eval(lines, images):
    """pycocotools' COCOeval against the harness's fast path (transfer/fast_eval.py) on the same
    generated detections: evaluate + accumulate + summarize, boxes."""
    import contextlib
    import io



    gt_dict, results = coco_eval_data(images)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(results)
    seconds, stats = {}, {}
    for name, cls in (("pycocotools COCOeval", COCOeval), ("fast path", FasterCOCOeval)):
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            ev = cls(gt, dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        seconds[name] = time.perf_counter() - t
        stats[name] = np.asarray(ev.stats)
    diff = float(np.abs(stats["pycocotools COCOeval"] - stats["fast path"]).max())
    slow, fast = seconds["pycocotools COCOeval"], seconds["fast path"]
    lines += [f"### COCO box evaluation: {images} generated images, "
              f"{len(gt_dict['annotations'])} objects, {len(results)} detections "
              "(100 per image)", "",
              "| evaluator | seconds (evaluate + accumulate + summarize) |", "|---|---|",
              f"| pycocotools 2.0.8 COCOeval | {slow:.1f} |",
              f"| fast path: faster-coco-eval COCOeval (transfer/fast_eval.py) | {fast:.1f} |",
              "", f"Speed-up: **{slow / fast:.1f}x**; the 12 summary numbers differ by at most "
              f"{diff:.1e} (AP {100 * stats['fast path'][0]:.2f}). Same detections, one process, "
              "loading the results (`loadRes`) not timed.", ""]


if __name__ == "__main__":
    sys.exit(main())
