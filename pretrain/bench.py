"""`make bench`: pretraining throughput, harness overhead, converter and results timings.

Results are appended to one Markdown file (default BENCHMARKS.md) under a heading naming the
machine (CPU model, cores, GPU, torch version), so figures from different machines never mix.

    python -m pretrain.bench [--out BENCHMARKS.md] [--only pretrain,data,harness,convert,results]
"""
import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

from pretrain import engine, loader
from pretrain.builder import MoCo


def machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}, "
            f"fast bf16 CPU: {engine.cpu_has_fast_bf16()}")


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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        q, k = (x.to(device) for x in data[i % 2])
        if channels_last:
            q = q.contiguous(memory_format=torch.channels_last)
            k = k.contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, labels = model(q, k, generator=torch.Generator().manual_seed(i))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
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
    from pretrain.synthetic import generate

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
from transfer.train_net import Trainer
from detectron2.engine import DefaultTrainer
from detectron2.utils.events import EventStorage
import transfer.datasets
which, iters = sys.argv[1], int(sys.argv[2])
cfg = setup_cfg("synthetic_mask_fpn_1k", "random", scale="smoke",
                overrides=["SOLVER.MAX_ITER", str(iters + 5), "OUTPUT_DIR", sys.argv[3],
                           "TEST.PRECISE_BN.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0"])
torch.manual_seed(0)
if which == "harness":
    t = Trainer(cfg)
    loop = t._trainer
else:
    loop = DefaultTrainer(cfg)._trainer
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
    from pretrain.synthetic import generate
    from transfer.datasets import dataset_root

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

    from results.__main__ import main as results_main

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
    p.add_argument("--only", default="pretrain,data,harness,convert,results")
    p.add_argument("--steps", type=int, default=6, help="timed MoCo steps per variant")
    p.add_argument("--harness-iters", type=int, default=20)
    args = p.parse_args(argv)
    which = set(args.only.split(","))
    lines = [f"## {machine()}", "",
             f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} with "
             f"`python -m pretrain.bench --only {args.only}`.", ""]
    if "pretrain" in which:
        bench_pretrain(lines, args.steps)
    if "data" in which:
        bench_data(lines)
    if "harness" in which:
        bench_harness(lines, args.harness_iters)
    if "convert" in which:
        bench_convert(lines)
    if "results" in which:
        bench_results(lines)
    text = "\n".join(lines) + "\n"
    print(text)
    header = "" if os.path.exists(args.out) else (
        "# Benchmarks\n\nAppended by `make bench`; each section names the machine it ran on.\n\n")
    with open(args.out, "a") as f:
        f.write(header + text)
    return 0


def bench_convert(lines):
    from convert.to_detectron2 import convert

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


if __name__ == "__main__":
    sys.exit(main())
