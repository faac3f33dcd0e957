"""Side-by-side speed of one demo fine-tuning iteration: before vs after the CPU speed-ups.

    python -m tools.bench_demo [--task synthetic_mask_fpn_1k] [--rounds 2] [--iters 30]
                               [--out BENCHMARKS.md]

Each variant runs in its own process (fresh allocator, fresh threads), the variants alternate
(before, after, before, after, ...) so that a change in the machine's load hits both, and each
process times ``--iters`` training iterations after ``--warmup`` through the harness Trainer
(hooks, writers, data loader and all), at smoke scale, on the same data, seed and init.

    before: what the harness did until issue #17: OpenMP's default (spinning) waits, 2 data
            workers competing with the main process' 2 intra-op threads, every writer
            (console, metrics.json, TensorBoard) flushed every iteration, SGD's per-tensor
            update loop.
    after:  the current defaults (transfer/speed.py, convert/runtime.py): passive OpenMP waits,
            no data workers for small images, writers every 20 iterations, SGD's multi-tensor
            (foreach) update.
    after, 2 jobs: the same, two runs at once with half the cores each (tools/suite.py --jobs),
            as `make demo` runs its seeds on a CPU; iterations per second count both runs.

The section is written into BENCHMARKS.md atomically (replacing an earlier section of the same
title).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from convert.machine import cpu_count
from convert.runtime import omp_environment
from pretrain import synthetic
from tools.benchmarking import machine, publish, timed_steps
from transfer.config import setup_cfg
from transfer.datasets import dataset_root
from transfer.sampling import seed_everything
from transfer.trainer import Trainer

SECTION = "### Demo fine-tuning iteration, before/after the CPU speed-ups (issue #17)"

VARIANTS = {
    "before": dict(workers=2, period=1, foreach=False, omp="default", jobs=1),
    "after": dict(workers=None, period=None, foreach=None, omp="passive", jobs=1),  # defaults
    # the defaults, two runs side by side with half the cores each (`make suite JOBS=2`, the
    # demo on a CPU): throughput is 2 iterations per step time
    "after, 2 jobs": dict(workers=None, period=None, foreach=None, omp="passive", jobs=2),
}


class PeriodTrainer(Trainer):
    """The harness Trainer with the writers every `period` iterations (None: the default)."""

    def __init__(self, cfg, period=None):
        self.period = period
        super().__init__(cfg)

    def writer_period(self):
        return self.period or super().writer_period()


def _child(args):
    """One process: time args.iters iterations of one variant; print JSON on the last line."""
    v = json.loads(args.child)
    torch.set_num_threads(max(1, cpu_count() // v["jobs"]))  # this run's share of the cores
    seed_everything(0)  # the same init in every process
    opts = ["SOLVER.MAX_ITER", str(args.max_iter)]
    if v["workers"] is not None:  # after the speed defaults: the override wins
        opts += ["DATALOADER.NUM_WORKERS", str(v["workers"])]
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as out:
        cfg = setup_cfg(args.task, "random", scale="smoke", overrides=opts, output=out)
        trainer = PeriodTrainer(cfg, v["period"])
        if v["foreach"] is not None:
            for group in trainer.optimizer.param_groups:
                group["foreach"] = v["foreach"]
        trainer.resume_or_load(resume=False)
        times, losses = zip(*timed_steps(trainer, args.warmup + args.iters))
    res = dict(times=times[args.warmup:], losses=losses,
               omp=os.environ.get("OMP_WAIT_POLICY") or "(unset)",
               workers=cfg.DATALOADER.NUM_WORKERS, threads=torch.get_num_threads(),
               foreach=trainer.optimizer.param_groups[0].get("foreach"),
               period=[trainer.writer_period()])
    print(json.dumps(res))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="synthetic_mask_fpn_1k")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-iter", type=int, default=1000, help="the schedule's length (lr)")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    synthetic.generate(os.path.join(dataset_root(), "synthetic"), quiet=True)
    runs = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        for name, v in VARIANTS.items():
            cmd = [sys.executable, "-m", "tools.bench_demo", "--task", args.task, "--iters",
                   str(args.iters), "--warmup", str(args.warmup), "--max-iter",
                   str(args.max_iter), "--child", json.dumps(v)]
            # the variant's OpenMP policy, in the environment torch will load OpenMP with
            env = omp_environment(v["omp"], os.environ)
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env) for _ in range(v["jobs"])]
            for proc in procs:
                out, err = proc.communicate()
                if proc.returncode:
                    sys.stderr.write(err[-3000:])
                    raise SystemExit(f"variant {name} failed")
                rec = json.loads(out.strip().splitlines()[-1])
                runs[name].append(rec)
                print(f"[bench_demo] round {r + 1} {name}: median step "
                      f"{statistics.median(rec['times']) * 1000:.0f} ms", flush=True)
    med = {k: statistics.median([t for rec in v for t in rec["times"]]) for k, v in runs.items()}
    per_proc = {k: [statistics.median(rec["times"]) * 1000 for rec in v] for k, v in runs.items()}
    rate = {k: VARIANTS[k]["jobs"] / med[k] for k in VARIANTS}  # iterations/s, all runs
    load = os.getloadavg()
    lb, la = runs["before"][0]["losses"], runs["after"][0]["losses"]
    n = min(len(lb), len(la), 10)
    lines = [
        SECTION, "",
        f"{machine()}, torch threads {runs['after'][0]['threads']}; "
        f"measured {time.strftime('%Y-%m-%d %H:%M')} with `python -m tools.bench_demo "
        f"--rounds {args.rounds} --iters {args.iters}` (load average at the end "
        f"{load[0]:.2f}; the machine is shared, so the variants alternate).", "",
        f"Task `{args.task}` at smoke scale, random init, seed 0; "
        f"{args.iters} timed iterations after {args.warmup} warm-up per process, "
        f"{args.rounds} processes per variant, alternating.", "",
        "| variant | OMP_WAIT_POLICY | threads per run | data workers | writer period | "
        "SGD foreach | median step (ms) | it/s (all runs) | per-process medians (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in VARIANTS:
        rec = runs[k][0]
        lines.append(f"| {k} | {rec['omp']} | {rec['threads']} | {rec['workers']} | "
                     f"{rec['period'][0] if rec['period'] else '-'} | {bool(rec['foreach'])} | "
                     f"{med[k] * 1000:.0f} | {rate[k]:.2f} | "
                     f"{', '.join(f'{x:.0f}' for x in per_proc[k])} |")
    lines += ["", f"Speed-up over before: **{rate['after'] / rate['before']:.2f}x** iterations "
              f"per second for one run, **{rate['after, 2 jobs'] / rate['before']:.2f}x** with "
              "two runs at once.", "",
              "Loss (total_loss) of the first iterations, same seed and init, to show the "
              "variants train the same:", "",
              "| iteration | " + " | ".join(str(i) for i in range(n)) + " |",
              "|---|" + "---|" * n,
              "| before | " + " | ".join(f"{x:.3f}" for x in lb[:n]) + " |",
              "| after | " + " | ".join(f"{x:.3f}" for x in la[:n]) + " |", ""]
    publish(args.out, "\n".join(lines) + "\n", "bench_demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
