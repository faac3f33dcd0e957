"""`make gpu-check`: the one command a GPU machine runs; figures into BENCHMARKS.md's GPU section.

In order, the most important first, each step in its own process with its own time limit (a
lent machine has about 15 minutes, start-up included):

1. the tests marked `cuda` (tests/test_devices.py: MoCo pretraining and a fine-tuning with
   evaluation on CUDA, each killed and resumed, its checkpoint read on the CPU);
2. pretraining end to end: MoCo v2 ResNet-50 at 224 px from a folder of generated JPEG photos
   through the real DataLoader (the CUDA defaults) and the batched augmentation, images/s;
3. its input ceiling: the DataLoader and the batched augmentation alone, and the augmentation
   alone on the GPU (tools/bench_augment.py's timings on the same folder);
4. one protocol-size training iteration per transfer task family (tools/bench_tasks.py; needs
   ../shared/data or the sample `make gpu-bundle` carries);
5. where the machine has 2 GPUs or more, pretraining and fine-tuning in 2 processes over NCCL
   (NCCL refuses two ranks on one GPU: on a 1-GPU machine the section says so).

The section names the device, Python, torch and numpy. Without CUDA it says so in one line and
exits 1, after the checks that need none (the installed stack imports).

    python -m tools.gpu_check [--out BENCHMARKS.md] [--only tests,pretrain,input,tasks,nccl]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import detectron2
import numpy as np
import PIL
import torch
from PIL import Image

from pretrain import main_moco
from tools import bench_augment
from tools.benchmarking import publish
from transfer.d2 import has_compiled_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one task per family: VOC C4, COCO FPN / C4 masks, keypoints, LVIS, Cityscapes, DensePose,
# semantic segmentation
TASK_FAMILIES = ("voc_frcnn_c4_24k", "coco_mask_fpn_1x", "coco_mask_c4_1x", "coco_kp_fpn_2x",
                 "lvis_mask_fpn_1x", "cityscapes_mask_fpn_24k", "coco_densepose_fpn_s1x",
                 "voc_semseg_fcn_30k")
PRETRAIN_BATCH, PRETRAIN_ITERS, PRINT_FREQ = 256, 60, 10
PHOTOS, PHOTO_SIZE = 1536, (480, 400)  # about ImageNet's mean photo (486 x 401)
# seconds per step: together within 15 minutes of device time less start-up and installation
LIMITS = {"tests": 300, "pretrain": 150, "input": 90, "tasks": 240, "nccl": 120}


def stack():
    """One line: what this Python runs (detectron2 through the stand-in: no CUDA needed)."""
    ops = "compiled ops" if has_compiled_ops() else "stand-in for compiled ops"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, numpy "
            f"{np.__version__}, Pillow {PIL.__version__}, detectron2 {detectron2.__version__} "
            f"({ops})")


def generated_photos(folder, count=PHOTOS, size=PHOTO_SIZE, seed=0):
    """JPEG photos with smooth structure (upsampled noise, not white noise, which JPEG decodes
    far slower than photos), in an ImageFolder tree of 4 classes."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = os.path.join(folder, f"c{i % 4}")
        os.makedirs(sub, exist_ok=True)
        low = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(low).resize(size, Image.BICUBIC).save(os.path.join(sub, f"{i}.jpg"),
                                                             quality=90)
    return folder


def measure_pretrain(photos, work):
    """Images/s of MoCo v2 R50 pretraining, whole iterations (loader, augmentation, step)."""
    out = os.path.join(work, "pretrain")
    args = main_moco.get_args_parser().parse_args(
        ["--data", photos, "--output", out, "--arch", "resnet50", "--batch-size",
         str(PRETRAIN_BATCH), "--epochs", "100", "--max-iters", str(PRETRAIN_ITERS),
         "--print-freq", str(PRINT_FREQ), "--device", "cuda", "--quiet"])
    main_moco.main(args)
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    steady = [r["img_per_s"] for r in rows[1:]]  # the first interval carries the start-up
    return {"img_per_s": sum(steady) / len(steady), "intervals": len(steady),
            "batch": PRETRAIN_BATCH, "precision": args.precision or "auto",
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def measure_input(photos, work):
    device = torch.device("cuda")
    on_device = bench_augment.time_batched(device, 224, 256, 20, sample=photos)
    through, workers = bench_augment.time_loader(device, 224, 256, 30, sample=photos)
    return {"augment_img_per_s": on_device, "loader_img_per_s": through, "workers": workers}


MEASURES = {"pretrain": measure_pretrain, "input": measure_input}


def run_step(name, cmd, timeout, log, env=None):
    t = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             timeout=timeout, env=env)
        status = "passed" if res.returncode == 0 else f"failed (exit {res.returncode})"
    except subprocess.TimeoutExpired:
        status = f"stopped at its {timeout} s limit"
    seconds = time.perf_counter() - t
    print(f"[gpu_check] {name}: {status}, {seconds:.0f} s", flush=True)
    return status, seconds


def measured_step(kind, photos, work, timeout, log):
    record = os.path.join(work, f"{kind}.json")
    status, seconds = run_step(kind, [sys.executable, "-m", "tools.gpu_check", "--measure",
                                      kind, "--photos", photos, "--record", record], timeout, log)
    figures = json.load(open(record)) if os.path.exists(record) else None
    return status, seconds, figures


def nccl_steps(work, photos):
    """(name, command, environment) of the 2-process runs: pretraining through torchrun,
    fine-tuning with evaluation through the harness's launcher, on generated data."""
    data = os.path.join(work, "nccl-data")
    gen = ("from pretrain import synthetic; import sys; synthetic.generate(sys.argv[1], "
           "n_unlabeled=0, n_labeled_per_class=0, n_train=16, n_val=8, quiet=True)")
    subprocess.run([sys.executable, "-c", gen, os.path.join(data, "synthetic")], cwd=ROOT,
                   check=True)
    pretrain = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "pretrain.main_moco", "--arch", "resnet18",
                "--data", photos, "--batch-size", "64", "--max-iters", "6",
                "--output", os.path.join(work, "nccl-pretrain"), "--quiet"]
    transfer = [sys.executable, "-m", "transfer.train_net", "--task", "synthetic_frcnn_fpn_1k",
                "--scale", "smoke", "--num-gpus", "2", "--runs", os.path.join(work, "nccl-runs"),
                "SOLVER.MAX_ITER", "4"]
    env = dict(os.environ, DETECTRON2_DATASETS=data)
    return [("2-process NCCL pretraining", pretrain, None),
            ("2-process NCCL fine-tuning", transfer, env)]


def section(lines_in, device, steps, figures):
    lines = [f"## GPU check: {device}", "",
             f"{lines_in}; measured {datetime.datetime.now():%Y-%m-%d %H:%M} with "
             "`make gpu-check`.", "", "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in steps]
    p, i = figures.get("pretrain"), figures.get("input")
    if p:
        lines += ["", f"Pretraining end to end (MoCo v2 ResNet-50, 224 px, batch {p['batch']}, "
                  f"precision {p['precision']}, {PHOTOS} generated {PHOTO_SIZE[0]}x"
                  f"{PHOTO_SIZE[1]} JPEG photos): **{p['img_per_s']:.0f} images/s** (mean of "
                  f"{p['intervals']} intervals of {PRINT_FREQ} iterations after the first); "
                  f"peak GPU memory {p['peak_mem_gib']:.1f} GiB."]
    if i:
        lines += ["", f"Its input ceiling: the DataLoader ({i['workers']} workers, the CUDA "
                  f"defaults) feeding the batched augmentation, **{i['loader_img_per_s']:.0f} "
                  f"images/s**; the batched augmentation alone on the GPU (batch 256, "
                  f"host-to-device copy included) {i['augment_img_per_s']:.0f} images/s."]
    if figures.get("tasks"):
        lines += ["", "One protocol-size training iteration per task family: the "
                  "`## One full-size training iteration per task` section that "
                  "tools/bench_tasks.py wrote (device named in its machine line)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--only", default="tests,pretrain,input,tasks,nccl")
    p.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    p.add_argument("--photos", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:  # one measurement, in its own process (run_step)
        with tempfile.TemporaryDirectory() as work:
            figures = MEASURES[args.measure](args.photos, work)
        with open(args.record, "w") as f:
            json.dump(figures, f)
        return 0

    line = stack()
    print(f"[gpu_check] {line}", flush=True)
    if not torch.cuda.is_available():
        print("error: no CUDA device here (torch sees none): make gpu-check runs on a GPU "
              "machine", file=sys.stderr)
        return 1
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    which = set(args.only.split(","))
    steps, figures = [], {}

    def record(name, status, seconds):  # the section after each step: a cut-off run keeps it
        steps.append((name, status, seconds))
        publish(args.out, section(line, device, steps, figures), "gpu_check")

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work, \
            open(os.path.join(ROOT, "gpu-check.log"), "w") as log:
        if "tests" in which:
            record("tests marked cuda (pretraining, fine-tuning: killed, resumed)", *run_step(
                "tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"],
                LIMITS["tests"], log))
        photos = generated_photos(os.path.join(work, "photos"))
        for kind in ("pretrain", "input"):
            if kind in which:
                status, seconds, fig = measured_step(kind, photos, work, LIMITS[kind], log)
                if fig:
                    figures[kind] = fig
                record(f"{kind} benchmark", status, seconds)
        if "tasks" in which:
            status, seconds = run_step("tasks", [sys.executable, "-m", "tools.bench_tasks",
                                                 "--out", args.out, *TASK_FAMILIES],
                                       LIMITS["tasks"], log)
            figures["tasks"] = status == "passed"
            record("one iteration per task family", status, seconds)
        if "nccl" in which:
            if torch.cuda.device_count() >= 2:
                for name, cmd, env in nccl_steps(work, photos):
                    record(name, *run_step(name, cmd, LIMITS["nccl"], log, env))
            else:
                record("2-process NCCL runs", "not run: one GPU (NCCL refuses two ranks on one "
                       "device)", 0.0)
    return 0 if all(s == "passed" or s.startswith("not run") for _, s, _ in steps) else 1

if __name__ == "__main__":
    sys.exit(main())
