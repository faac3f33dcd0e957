"""Pretraining input, split augmentation against the PIL path, side by side in one run
(a `make bench` section), and the kNN comparison of the two paths.

    python -m tools.bench_augment [--out BENCHMARKS.md]      # this CPU: per-core rates
    python -m tools.bench_augment --device cuda --out BENCHMARKS.md
        # the GPU side: the batched augmentation on the GPU, and the real DataLoader (workers on
        # every core but one, pinned, persistent, prefetching) feeding it, end to end
    python -m tools.bench_augment --knn --seeds 0 1 2 --out BENCHMARKS.md
        # a short pretraining on the ImageNet sample per path and seed, then kNN top-1 on the
        # VOC sample's objects, instance retrieval on the ImageNet sample, the last epoch's loss
        # (the runs' checkpoints are deleted once probed; logs and metrics.json stay)

The images are the 1000-photo ImageNet sample (../shared/data/imagenet_sample/train).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import scipy.stats
import torch
import torchvision.transforms as T

from convert import safe_load
from convert.machine import cpu_count
from pretrain import augment, feed, loader, main_moco, views
from pretrain.knn import extract_features, knn_accuracy
from tools.benchmarking import machine, publish
from tools.sample_data import voc_objects

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")
SAMPLE = os.path.join(SHARED, "imagenet_sample", "train")
CORES_PROJECTED = 16
# the kNN comparison's pretraining: the README's short ImageNet-sample run, K below the epoch
KNN_RUN = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "64", "--moco-k", "512",
           "--moco-m", "0.99", "--lr", "0.06", "--epochs", "10", "--workers", "1", "--quiet",
           "--print-freq", "1"]


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rate(dataset, n):
    """Images per CPU second of dataset[(0, i)] for the first n images, on one thread: what a
    worker with a core of its own delivers (the process's CPU time, so that other processes
    on a shared machine do not count)."""
    with threads(1):
        t = time.process_time()
        for i in range(n):
            dataset[(0, i)]
        return n / (time.process_time() - t)


def datasets(size):
    split, whole = views.SplitViews("v2", size), views.SplitViews("v2", size, draft=False)
    return {
        "decode only (PIL, to RGB)": loader.ImageFiles(SAMPLE, lambda img: img),
        "old path: PIL aug+, both views (`--augment-on cpu`)": loader.ImageFiles(
            SAMPLE, loader.TwoCropsTransform(loader.moco_augmentation("v2", size)), seed=0),
        "CPU part of the split path, both views (default)": loader.ImageFiles(
            SAMPLE, split.crop, seed=0, decode=split.decode),
        "CPU part, always decoding whole (no reduced-scale JPEG decode)": loader.ImageFiles(
            SAMPLE, whole.crop, seed=0, decode=whole.decode),
    }


def view_batches(size, batch, sample=SAMPLE):
    """Two batches (query and key views) of `batch` images' uint8 views and parameters."""
    split = views.SplitViews("v2", size)
    ds = loader.ImageFiles(sample, split.crop, seed=0, decode=split.decode)
    return torch.utils.data.default_collate([ds[(0, i)][0] for i in range(batch)])


def time_batched(device, size, batch, repeats, clock=time.perf_counter, sample=SAMPLE):
    """Images/s (two views each) of the batched augmentation, host-to-device copy included:
    the best of `repeats` timings after a warm-up (`clock` time.process_time: per CPU
    second)."""
    aug, pair = augment.BatchAugment("v2", device), view_batches(size, batch, sample)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for k in range(repeats + 1):
        sync()
        t = clock()
        for v in pair:
            aug(v)
        sync()
        if k:  # the first warms up
            best = max(best, batch / (clock() - t))
    return best


def time_loader(device, size, batch, batches, sample=SAMPLE):
    """Images/s of the real DataLoader with the defaults for `device`, each batch's views
    finished by the batched augmentation (the GPU side end to end)."""
    dataset, finish = feed.pipeline(sample, "v2", size, 0, "device", device)
    settings = feed.loader_settings(device, None, cpu_count())
    sampler = loader.ResumableSampler(len(dataset), batch)
    data = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                       drop_last=True, **settings)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    done, t = 0, None
    for epoch in range(batches // sampler.batches_per_epoch + 2):
        sampler.set_epoch(epoch)
        for k, (pair, _) in enumerate(data):
            for v in pair:
                finish(v)
            if t is None and k == 1:  # the workers have started and filled their queues
                sync()
                t, done = time.perf_counter(), 0
            done += batch
            if t is not None and done >= batches * batch:
                sync()
                return done / (time.perf_counter() - t), settings["num_workers"]
    raise RuntimeError("not enough batches")


def bench_speed(lines, device, images, size=224, batch=64):
    load = os.getloadavg()[0]
    sets = datasets(size)
    runs = {name: [] for name in sets}
    for order in (list(sets), list(sets)[::-1], list(sets)):  # alternating: drift cancels out
        for name in order:
            runs[name].append(rate(sets[name], images))
    # the least disturbed pass of each: other processes on the machine only ever slow one down
    per_core = {k: max(v) for k, v in runs.items()}
    spread = max(max(v) / min(v) - 1 for v in runs.values())
    old, new = per_core[list(sets)[1]], per_core[list(sets)[2]]
    workers = CORES_PROJECTED - 1
    lines += [f"### Pretraining input: split augmentation against the PIL path, {size} px, "
              f"{device.type}", "",
              f"{machine()}; measured {time.strftime('%Y-%m-%d %H:%M')} with `python -m "
              f"tools.bench_augment --device {device.type} --images {images}`.", "",
              f"{images} photos of the ImageNet sample (mean 486x401 px), MoCo v2 aug+, "
              "two views per image; images per CPU second of one thread (a worker with a core of "
              "its own; CPU time, so that the other processes of this shared machine do not "
              f"count); each row the best of 3 passes run alternately (a row's passes differed by up to "
              f"{spread * 100:.0f}%); load average {load:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end.", "",
              "| per-image CPU work | images/s per core |", "|---|---|"]
    lines += [f"| {name} | {v:.0f} |" for name, v in per_core.items()]
    lines += ["", f"CPU part against the old path: **{new / old:.1f}x** per core. Projected "
              f"{CORES_PROJECTED}-core ceiling ({workers} workers, one core driving the GPU): "
              f"**{new * workers:.0f} images/s** (old path {old * workers:.0f}).", ""]
    if device.type == "cpu":
        cores = torch.get_num_threads()
        with threads(1):
            one = time_batched(device, size, batch, 3, time.process_time)
        every = time_batched(device, size, batch, 3)
        lines += [f"Batched augmentation (jitter, grayscale, blur, normalise; kornia) on this "
                  f"CPU, batch {batch} (two views per image; uint8 in, float32 out): "
                  f"**{one:.0f} images per CPU second** on one thread; {every:.0f} images/s "
                  f"wall-clock with {cores} threads on this shared machine.", ""]
    else:
        on_device = time_batched(device, size, 256, 20)
        through, workers_used = time_loader(device, size, 256, 30)
        lines += [f"Batched augmentation on {torch.cuda.get_device_name(device)}, batch 256, "
                  f"host-to-device copy included: **{on_device:.0f} images/s**.",
                  f"The DataLoader with the CUDA defaults ({workers_used} workers, pinned, "
                  f"persistent, prefetch {feed.CUDA_PREFETCH}) feeding it, end to end: "
                  f"**{through:.0f} images/s** on {cpu_count()} cores.", ""]
    lines += ["The GPU side, one command on a GPU machine: `python -m tools.bench_augment "
              "--device cuda --out BENCHMARKS.md`.", ""]


def instance_retrieval(encoder, folder, size, seed=0):
    """Top-1 (%) of finding each image's centre crop among all of them from a random resized
    crop of it (scale 0.3-1, flipped half the time; no colour op, so that neither path's colour
    ops are favoured)."""
    cpu = torch.device("cpu")
    crops = T.Compose([T.RandomResizedCrop(size, scale=(0.3, 1.0)), T.RandomHorizontalFlip(),
                       T.ToTensor(), T.Normalize(loader.IMAGENET_MEAN, loader.IMAGENET_STD)])
    centre, _ = extract_features(encoder, folder, cpu, size)
    query, _ = extract_features(encoder, folder, cpu, size, transform=crops, seed=seed)
    return ((query @ centre.T).argmax(1) == torch.arange(len(centre))).float().mean().item() * 100


def probes(encoder, knn_folder, size):
    """(kNN top-1 on the labelled folder, instance retrieval top-1 on the ImageNet sample)."""
    return (knn_accuracy(encoder, knn_folder, torch.device("cpu"), size),
            instance_retrieval(encoder, SAMPLE, size))


def last_epoch_loss(run_dir, iterations):
    """Mean loss of the last `iterations` iterations (logged every iteration: --print-freq 1;
    a resumed run logs some again, identically)."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        losses = {r["iteration"]: r["loss"] for r in map(json.loads, f)}
    last = max(losses)
    return statistics.mean(v for k, v in losses.items() if k > last - iterations)


def pretrain_and_probe(args_list, knn_folder):
    """Pretrain (or pick up the finished run in --output), then (kNN, retrieval, loss of the
    last epoch)."""
    args = main_moco.get_args_parser().parse_args(args_list)
    ckpt = main_moco.main(args)
    model = main_moco.build_model(args, 1)
    state = safe_load.load_torch(ckpt)
    main_moco.load_state(model, state["state_dict"])
    return (*probes(model.encoder_q, knn_folder, args.image_size),
            last_epoch_loss(args.output, state["batches_per_epoch"]))


def bench_knn(lines, seeds, runs_dir):
    knn_folder = voc_objects(SHARED, os.path.join(runs_dir, "voc_objects"))
    measures = ("kNN top-1, VOC objects", "instance retrieval top-1", "loss, last epoch")
    got = {p: [] for p in feed.PATHS}
    load = os.getloadavg()[0]
    for seed in seeds:
        for path in feed.PATHS:
            out = os.path.join(runs_dir, f"{path}_seed{seed}")
            got[path].append(pretrain_and_probe(
                ["--data", SAMPLE, *KNN_RUN, "--seed", str(seed), "--augment-on", path,
                 "--output", out], knn_folder))
            for name in os.listdir(out):  # 140 MB each, of no use once probed
                if name.endswith(".pth.tar"):
                    os.remove(os.path.join(out, name))
            print(f"[bench_augment] seed {seed} --augment-on {path}: " + ", ".join(
                f"{m} {v:.2f}" for m, v in zip(measures, got[path][-1])), flush=True)
    args = main_moco.resolve_args(main_moco.get_args_parser().parse_args(
        ["--data", SAMPLE, *KNN_RUN]))
    torch.manual_seed(0)
    random_init = probes(main_moco.build_model(args, 1).encoder_q, knn_folder, args.image_size)
    n_images = sum(len(f) for _, _, f in os.walk(knn_folder))
    lines += ["### kNN after a short pretraining on the ImageNet sample, per augmentation path",
              "", f"{machine()}; measured {time.strftime('%Y-%m-%d %H:%M')} with `python -m "
              f"tools.bench_augment --knn --seeds {' '.join(map(str, seeds))}` (load average "
              f"{load:.2f} at the start): MoCo v2, `{' '.join(KNN_RUN)}` (150 iterations), "
              "precision auto. Then, with the query encoder: leave-one-out weighted kNN top-1 "
              f"(k 20, t 0.07) on the {n_images} objects of the VOC sample (20 classes; person "
              "31%), and instance retrieval on the 1000 ImageNet-sample photos (each photo's "
              "centre crop found from a random resized crop of it, scale 0.3-1, flip, no "
              "colour op: chance 0.1%).", "",
              "| seed | path | " + " | ".join(measures) + " |", "|---|---|---|---|---|"]
    for k, seed in enumerate(seeds):
        lines += [f"| {seed} | `--augment-on {p}` | " + " | ".join(
            f"{v:.2f}" for v in got[p][k]) + " |" for p in feed.PATHS]
    for p in feed.PATHS:
        lines.append(f"| mean ± std (ddof 1) | `--augment-on {p}` | " + " | ".join(
            f"{statistics.mean(col):.2f} ± {statistics.stdev(col):.2f}"
            for col in zip(*got[p])) + " |")
    lines += ["| random init (seed 0) | | " + " | ".join(f"{v:.2f}" for v in random_init) +
              " | |", ""]
    diffs = []
    for m, dev, cpu in zip(measures, zip(*got["device"]), zip(*got["cpu"])):
        p = scipy.stats.ttest_ind(dev, cpu, equal_var=False).pvalue
        diffs.append(f"{m} {statistics.mean(dev) - statistics.mean(cpu):+.2f} (p = {p:.2f})")
    lines += ["Device path minus cpu path, Welch two-sided over seeds: " + "; ".join(diffs) +
              ".", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=200, help="photos per speed measurement")
    p.add_argument("--knn", action="store_true", help="the kNN comparison instead of speed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="", help="where the kNN runs go (default: a temp dir)")
    args = p.parse_args(argv)
    if not os.path.isdir(SAMPLE):
        raise SystemExit(f"{SAMPLE} not found: the ImageNet sample in ../shared/data")
    lines = []
    if args.knn:
        with (contextlib.nullcontext(args.runs) if args.runs
              else tempfile.TemporaryDirectory()) as d:
            bench_knn(lines, args.seeds, d)
    else:
        bench_speed(lines, torch.device(args.device), args.images)
    publish(args.out, "\n".join(lines) + "\n", "bench_augment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
