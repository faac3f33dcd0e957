"""`make bench-tasks`: the cost of one full-size training iteration of every transfer task.

For each task (or those named): the task resolved at full scale, one image per batch, two
training iterations at the protocol's largest training size on the full-protocol tier's data
(tools/fixtures/protocol.py: real samples, generated fixtures at real image sizes), no evaluation.
Reported per task: the training input sizes the model saw, the protocol's test size, CPU seconds
(all threads of the process) and wall seconds of the second iteration (forward, backward,
optimizer step; the first carries one-off allocations), and the peak resident memory up to it.
Tasks that differ only in their schedule (a 1x and its 2x) are measured once. Appended to
BENCHMARKS.md under the machine's heading.

    python -m tools.bench_tasks [--out BENCHMARKS.md] [TASK ...]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import torch

from tools.benchmarking import machine, publish
from tests.conftest import SHARED_DATA
from tools.fixtures.protocol import write_protocol_datasets
from tests.test_full_protocol import run_key, tier_overrides
from transfer.config import setup_cfg
from transfer.configs import known_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(task, data_root, work):
    record = os.path.join(work, f"{task}.json")
    overrides = tier_overrides(task, fewer_rois=False)  # the protocol's ROI counts
    overrides[overrides.index("SOLVER.MAX_ITER") + 1] = "2"
    overrides += ["DATASETS.TEST", "()"]
    cmd = [sys.executable, "-m", "transfer.protocol_probe", "--record", record, "--",
           "--task", task, "--weights", "random", "--runs", os.path.join(work, "runs"),
           *overrides]
    with open(os.path.join(work, f"{task}.log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DETECTRON2_DATASETS=data_root),
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(record) as f:
        rec = json.load(f)
    train = sorted({"x".join(map(str, im["size"])) for fwd in rec["forwards"]
                    if fwd["mode"] == "train" for im in fwd["images"]})
    cfg = setup_cfg(task, "random")
    test = ("full image" if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
            else f"short {cfg.INPUT.MIN_SIZE_TEST}, long <= {cfg.INPUT.MAX_SIZE_TEST}")
    step = rec["train_steps"][-1]
    return {"task": task, "train": ", ".join(train), "test": test, "cpu_s": step["cpu_s"],
            "wall_s": step["wall_s"], "rss_train": step["peak_rss_mb"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("tasks", nargs="*", help="default: every task")
    args = p.parse_args(argv)
    tasks = args.tasks or known_tasks()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as work:
        data_root = write_protocol_datasets(SHARED_DATA, os.path.join(work, "data"))
        measured = {}
        for task in tasks:
            key = run_key(task)
            if key not in measured:
                measured[key] = measure(task, data_root, work)
            rows.append(dict(measured[key], task=task))
            r = rows[-1]
            print(f"{task}: {r['cpu_s']:.1f} CPU s, {r['wall_s']:.1f} s, "
                  f"{r['rss_train']:.0f} MB", flush=True)
    where = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"
    lines = [f"## One full-size training iteration per task (batch 1, {where})\n",
             f"{machine()}; measured {datetime.datetime.now():%Y-%m-%d %H:%M} with "
             f"`{' '.join(['python -m tools.bench_tasks'] + args.tasks)}`.\n",
             f"torch threads: {torch.get_num_threads()}. Training sizes are (h x w) as the model "
             "saw them (the largest of the protocol's sizes; the tier's real-size images); test "
             "sizes are the protocol's. CPU s counts every thread of the process (second "
             "iteration: forward, backward, optimizer step); peak RSS is the process's maximum "
             "resident memory up to that iteration. A 1x and its 2x share one measurement.\n",
             "| task | train size | test size | CPU s / iter | wall s / iter | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{r['task']}` | {r['train']} | {r['test']} | {r['cpu_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['rss_train']:.0f} |" for r in rows]
    publish(args.out, "\n".join(lines) + "\n", "bench_tasks")


if __name__ == "__main__":
    main()
