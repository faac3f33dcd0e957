"""Side-by-side cost of the process layouts on this CPU: the demo task's fine-tuning iteration
on 1 process x all threads against N gloo processes x 1 thread, and the communication per
iteration.

    python -m tools.bench_processes [--rounds 2] [--iters 20] [--out BENCHMARKS.md]

The demo task (synthetic_frcnn_fpn_1k at smoke scale, the demo's batch of 4) is timed through
the harness Trainer and the project's launcher (transfer/launch.py), exactly as `make transfer
NUM_GPUS=N` runs it, in three variants that alternate round by round so that a change in the
machine's load hits all of them:

    1 process: one process with every core's thread, the global batch of 4;
    N processes: N gloo processes with one thread each, 4 / N images each, BN synchronised
        (naiveSyncBN) and gradients all-reduced (DDP): the same global batch;
    N independent: N single processes with one thread each and 4 / N images each, run at once
        with no communication at all: the same arithmetic per process as "N processes".

Communication (and the waiting for the slower process that comes with it) per iteration is
"N processes" minus "N independent". The section is written into BENCHMARKS.md atomically.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import detectron2.utils.comm as comm

from pretrain import synthetic
from convert.machine import cpu_count
from tools.benchmarking import machine, publish, timed_steps
from transfer.datasets import dataset_root
from transfer.launch import launch
from transfer.train_net import parse_args, resolve
from transfer.trainer import Trainer

SECTION = "### Process layouts on a CPU: 1 process against N gloo processes (issue #24)"
TASK = "synthetic_frcnn_fpn_1k"
BATCH = 4  # the demo's global batch (tools/demo.py)


def _time_iterations(argv, warmup, iters, out):
    """Every process: `warmup + iters` training iterations; the main one writes the times."""
    cfg = resolve(parse_args(argv), comm.get_world_size())
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    times = [t for t, _ in timed_steps(trainer, warmup + iters)]
    if comm.is_main_process():
        with open(out, "w") as f:
            json.dump({"times": times[warmup:], "threads": torch.get_num_threads(),
                       "world_size": comm.get_world_size()}, f)


def _child(args):
    with tempfile.TemporaryDirectory(prefix="bench_processes_") as out:
        argv = ["--task", TASK, "--scale", "smoke", "--output", out,
                "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.MAX_ITER", "1000",
                "TEST.PRECISE_BN.ENABLED", "False"]
        launch(_time_iterations, args.procs, args=(argv, args.warmup, args.iters, args.child),
               threads=args.threads)


def run_variant(args, procs, threads, batch, copies=1):
    """`copies` processes of `procs` processes each, at once; the main processes' records."""
    work = tempfile.mkdtemp(prefix="bench_processes_")
    outs = [os.path.join(work, f"times{k}.json") for k in range(copies)]
    cmds = [[sys.executable, "-m", "tools.bench_processes", "--child", out, "--procs",
             str(procs), "--threads", str(threads), "--batch", str(batch), "--iters",
             str(args.iters), "--warmup", str(args.warmup)] for out in outs]
    running = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for c in cmds]
    for proc in running:
        _, err = proc.communicate()
        if proc.returncode:
            sys.stderr.write(err[-3000:])
            raise SystemExit("a benchmark process failed")
    records = []
    for out in outs:
        with open(out) as f:
            records.append(json.load(f))
    shutil.rmtree(work)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    synthetic.generate(os.path.join(dataset_root(), "synthetic"), quiet=True)
    n, cores = args.procs, cpu_count()
    variants = {
        "1 process": dict(procs=1, threads=cores, batch=BATCH),
        f"{n} processes": dict(procs=n, threads=n, batch=BATCH),
        f"{n} independent": dict(procs=1, threads=1, batch=BATCH // n, copies=n),
    }
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, v in variants.items():
            for rec in run_variant(args, **v):
                times[name] += rec["times"]
            print(f"[bench_processes] round {r + 1} {name}: median "
                  f"{statistics.median(times[name]) * 1000:.0f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    comm_ms = (med[f"{n} processes"] - med[f"{n} independent"]) * 1000
    lines = [
        SECTION, "",
        f"{machine()}; measured {time.strftime('%Y-%m-%d %H:%M')} with "
        f"`python -m tools.bench_processes --procs {n} --rounds {args.rounds} --iters "
        f"{args.iters}` (load average at the end {os.getloadavg()[0]:.2f}; the variants "
        "alternate).", "",
        f"Task `{TASK}` at smoke scale (Faster R-CNN R18-FPN, naiveSyncBN, 80-112 px), random "
        f"init; {args.iters} timed iterations after {args.warmup} warm-up per process, "
        f"{args.rounds} rounds; median seconds per iteration.", "",
        "| layout | processes x threads | images per process | s/iter | iterations of the "
        "global batch of 4 per second |", "|---|---|---|---|---|",
        f"| 1 process | 1 x {cores} | {BATCH} | {med['1 process']:.3f} | "
        f"{1 / med['1 process']:.2f} |",
        f"| {n} gloo processes (`NUM_GPUS={n}`) | {n} x 1 | {BATCH // n} | "
        f"{med[f'{n} processes']:.3f} | {1 / med[f'{n} processes']:.2f} |",
        f"| {n} independent processes, no communication | {n} x 1 | {BATCH // n} | "
        f"{med[f'{n} independent']:.3f} | - |", "",
        f"Communication per iteration ({n} processes minus {n} independent: naiveSyncBN's "
        f"all-reduce in every BN layer, forward and backward, DDP's gradient all-reduce, and "
        f"the wait for the slower process): **{comm_ms:.0f} ms**, "
        f"{comm_ms / 1000 / med[f'{n} processes'] * 100:.0f}% of the {n}-process iteration. "
        f"{n} processes run the global batch "
        f"{med['1 process'] / med[f'{n} processes']:.2f}x as fast as 1 process.", ""]
    publish(args.out, "\n".join(lines) + "\n", "bench_processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
