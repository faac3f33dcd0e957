"""Plan and run every task x weights x seed: ``make suite TASKS=... WEIGHTS=... SEEDS=5``.

    python -m tools.suite --tasks "voc_frcnn_c4_24k" --weights "moco=a.pkl supervised random" \
        --seeds 5 [--scale smoke] [--dry-run] [--slurm --partition P --gpus-per-node 8 ...]

Complete runs are skipped; interrupted or failed ones are started again and resume from their
last readable checkpoint (train_net resumes by itself, exactly: see the README's "Resume and
preemption"); the rest start fresh. A run killed during its final evaluation is evaluated
again from model_final.pth without training. So a suite killed at any moment and started again
runs only what is missing or incomplete. Locally the runs go one after another, or --jobs N at
a time (on a CPU each gets 1/N of the cores: small runs use 2 one-thread processes better than
one two-thread process, see BENCHMARKS.md; on GPUs each gets --num-gpus devices of its own);
each run has --num-gpus processes. With --slurm each run is one submitit job of one task per
GPU (or one job array with --array), and a job that SLURM preempts is requeued and resumes
(--cluster local: submitit's local executor, same requeue logic).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from convert import zoo
from convert.logs import progress_bar
from convert.machine import cpu_count
from convert.runtime import (add_process_flags, apply_omp_wait_policy, entry_point,
                             omp_environment)
from results.collect import read_run
from transfer.config import setup_cfg
from transfer.configs import known_tasks
from transfer.console import Console, add_console_flags, console_from_args
from transfer.run_dir import run_dir
from transfer.weights import parse_weights, prepare_weights


@dataclass
class PlannedRun:
    task: str
    weights_spec: str
    weights_name: str
    seed: int
    scale: str
    run_dir: str
    action: str  # skip | resume | start
    why: str
    zoo_opts: zoo.ZooOptions = zoo.ZooOptions()  # where its published checkpoints are cached

    def command(self, runs_root, num_gpus=1, extra=(), threads=None, flags=()):
        """train_net's command line: `num_gpus` processes started by train_net (1 where they
        are started from outside, as SLURM tasks), `threads` CPU threads shared among them,
        program `flags` (console, OpenMP policy); the KEY VALUE overrides `extra` come last."""
        return [sys.executable, "-m", "transfer.train_net", "--task", self.task, "--weights",
                self.weights_spec, "--seed", str(self.seed), "--scale", self.scale,
                "--runs", runs_root, "--num-gpus", str(num_gpus),
                *(["--threads", str(threads)] if threads else []), *flags,
                *zoo.zoo_argv(self.zoo_opts), *extra]


def child_env(omp_wait_policy, extra=None):
    """The environment of a run this suite starts: its slot's additions, and the OpenMP policy
    it is given on its command line already in place (so it need not start itself again)."""
    return omp_environment(omp_wait_policy, {**os.environ, **(extra or {})})


@dataclass
class Slot:
    """What one of the concurrent local runs gets: its GPUs (an environment to add), or its
    share of the CPU's cores."""
    env: dict
    threads: int = None


def local_slots(jobs, num_gpus, threads=None):
    """The `jobs` slots of a local suite whose runs have `num_gpus` processes each: on GPUs,
    num_gpus devices of their own (CUDA_VISIBLE_DEVICES); on a CPU, `threads` (default: every
    core) shared out equally."""
    if not torch.cuda.is_available():
        return [Slot({}, max(1, (threads or cpu_count()) // jobs)) for _ in range(jobs)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if jobs * num_gpus > len(devices):
        raise SystemExit(f"--jobs {jobs} x --num-gpus {num_gpus} needs {jobs * num_gpus} GPUs; "
                         f"this machine has {len(devices)}")
    return [Slot({"CUDA_VISIBLE_DEVICES": ",".join(devices[k * num_gpus:(k + 1) * num_gpus])})
            for k in range(jobs)]


def plan(tasks, weights, seeds, scale, runs_root, zoo_opts=zoo.ZooOptions()):
    """Every (task, weights, seed) with what to do about it."""
    unknown = [t for t in tasks if t not in known_tasks()]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}. Known tasks: {', '.join(known_tasks())}")
    planned = []
    for task in tasks:
        for spec in weights:
            name = parse_weights(spec, zoo_opts.registry)[0]
            for seed in seeds:
                d = run_dir(runs_root, task, name, seed, scale)
                if not os.path.isdir(d):
                    action, why = "start", "new"
                else:
                    row = read_run(d)
                    if row["state"] == "complete":
                        action, why = "skip", "complete"
                    else:
                        action = "resume"
                        why = f"{row['state']}" + (f": {row['reason']}" if row["reason"] else "")
                planned.append(PlannedRun(task, spec, name, seed, scale, d, action, why,
                                          zoo_opts))
    return planned


def run_local(planned, runs_root, num_gpus=1, extra=(), jobs=1, threads=None,
              console=Console(), omp_wait_policy="passive"):
    """Run what is not complete, `jobs` runs of `num_gpus` processes at a time (each in its
    slot: ``local_slots``), in this program's `console` mode and OpenMP policy; returns the
    number of failed runs."""
    todo = [p for p in planned if p.action != "skip"]
    if not todo:
        return 0
    slots = local_slots(jobs, num_gpus, threads)
    flags = ["--omp-wait-policy", omp_wait_policy]
    if console.quiet:
        return _run_local_quiet(todo, runs_root, num_gpus, extra, slots, flags)
    failures = 0

    def started(i, p, slot):
        print(f"[suite] ({i + 1}/{len(todo)}) {p.action}: {p.task} / {p.weights_name} / "
              f"seed {p.seed}", flush=True)
        return subprocess.Popen(p.command(runs_root, num_gpus, extra, slot.threads,
                                          flags + ["--verbose"]),
                                env=child_env(omp_wait_policy, slot.env))

    for _, p, proc in _pool(todo, started, slots):
        if proc.returncode != 0:
            failures += 1
            print(f"[suite] run failed (exit {proc.returncode}); see {p.run_dir}/status.json",
                  flush=True)
    return failures


def _pool(todo, start, slots, poll=None):
    """Start `start(i, planned_run, slot) -> Popen` for every run, one per free slot; yields
    (i, planned_run, finished Popen) as they end. `poll(running)` is called while waiting. On an
    exception (Ctrl-C included) the running processes are terminated: they resume next time."""
    pending, running, free = list(enumerate(todo)), [], list(slots)
    try:
        while pending or running:
            while pending and free:
                i, p = pending.pop(0)
                slot = free.pop(0)
                running.append((i, p, start(i, p, slot), slot))
            time.sleep(0.5)
            for r in [r for r in running if r[2].poll() is not None]:
                running.remove(r)
                free.append(r[3])
                yield r[:3]
            if poll is not None:
                poll(running)
    finally:
        for _, _, proc, _ in running:
            proc.terminate()
        for _, _, proc, _ in running:
            proc.wait()


def _max_iter(p, extra):
    try:
        return setup_cfg(p.task, p.weights_spec, seed=p.seed, scale=p.scale,
                         overrides=list(extra), output=p.run_dir,
                         zoo_opts=p.zoo_opts).SOLVER.MAX_ITER
    except Exception:  # the run itself reports a bad config
        return 1


def _read_progress(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _run_local_quiet(todo, runs_root, num_gpus, extra, slots, flags):
    """The quiet console (transfer/console.py): one progress bar over every iteration of every
    run; each run's terminal output goes to <run>/console.log, its log to <run>/log.txt."""
    iters = [_max_iter(p, extra) for p in todo]
    failures, finished = 0, 0
    bar = progress_bar(sum(iters), f"fine-tuning {len(todo)} runs"
                      + (f", {len(slots)} at a time" if len(slots) > 1 else ""), unit="it")
    with tempfile.TemporaryDirectory() as tmp:
        def progress(i):
            return os.path.join(tmp, f"run{i}")

        def start(i, p, slot):
            os.makedirs(p.run_dir, exist_ok=True)
            with open(os.path.join(p.run_dir, "console.log"), "a") as out:
                return subprocess.Popen(
                    p.command(runs_root, num_gpus, extra, slot.threads,
                              flags + ["--progress-file", progress(i)]),
                    stdout=out, stderr=subprocess.STDOUT, env=child_env(flags[1], slot.env))

        def poll(running):
            done = finished + sum(min(_read_progress(progress(i)), iters[i])
                                  for i, *_ in running)
            bar.set_postfix_str(", ".join(f"{p.weights_name} seed {p.seed}"
                                          for _, p, *_ in running), refresh=False)
            bar.update(max(0, done - bar.n))

        for i, p, proc in _pool(todo, start, slots, poll):
            finished += iters[i]
            if proc.returncode != 0:
                failures += 1
                bar.write(f"[suite] {p.task} / {p.weights_name} / seed {p.seed} failed (exit "
                          f"{proc.returncode}); see {p.run_dir}/console.log and status.json")
        bar.update(max(0, finished - bar.n))
    bar.close()
    return failures


class _SlurmRun:
    """A submitit callable: one task of one transfer run, one task per GPU (the run's process of
    that GPU, which train_net recognises from the rank, world size and master address given to
    it); on preemption the job is requeued and resumes.

    When the scheduler signals a preemption, submitit calls ``checkpoint`` and exits; the
    exit interrupts ``subprocess.run``, which kills the training process. Nothing is saved
    then: the requeued job resumes from the run's last checkpoint, exactly."""

    def __init__(self, planned, runs_root, extra, omp_wait_policy="passive"):
        self.planned, self.runs_root, self.extra = planned, runs_root, list(extra)
        self.omp_wait_policy = omp_wait_policy

    def __call__(self):
        import submitit

        layout = submitit.helpers.TorchDistributedEnvironment()
        env = child_env(self.omp_wait_policy, dict(
            RANK=str(layout.rank), WORLD_SIZE=str(layout.world_size),
            LOCAL_RANK=str(layout.local_rank), LOCAL_WORLD_SIZE=str(layout.local_world_size),
            MASTER_ADDR=layout.master_addr, MASTER_PORT=str(layout.master_port)))
        flags = ["--omp-wait-policy", self.omp_wait_policy, "--verbose"]
        subprocess.run(self.planned.command(self.runs_root, 1, self.extra, flags=flags),
                       env=env, check=True)
        return self.planned.run_dir

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)  # resumes from its run directory


def submit_slurm(planned, runs_root, args):
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(runs_root, "slurm", "%j"),
                                     cluster=args.cluster)
    executor.update_parameters(
        nodes=1, gpus_per_node=args.gpus_per_node, tasks_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min,
        slurm_partition=args.partition, name="moco-transfer")
    todo = [p for p in planned if p.action != "skip"]
    calls = [_SlurmRun(p, runs_root, args.opts, args.omp_wait_policy) for p in todo]
    if args.array:
        with executor.batch():
            jobs = [executor.submit(c) for c in calls]
    else:
        jobs = [executor.submit(c) for c in calls]
    for p, j in zip(todo, jobs):
        print(f"[suite] submitted job {j.job_id}: {p.task} / {p.weights_name} / seed {p.seed}")
    return jobs


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", required=True, help="space-separated task names")
    ap.add_argument("--weights", default="random",
                    help="space-separated: path.pkl, a published checkpoint's name (python -m "
                         "convert.zoo lists them), LABEL=path.pkl, LABEL=name, supervised, "
                         "random; a token that is an existing file is the file")
    ap.add_argument("--seeds", default="1", help="a count N (seeds 0..N-1) or a list '0,3,7'")
    ap.add_argument("--scale", default="full")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--num-gpus", type=int, default=1,
                    help="processes per local run: GPUs, or gloo processes on a CPU (with "
                         "--slurm: --gpus-per-node, one task per GPU)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="local runs at a time; on a CPU the cores are shared out among them, "
                         "on GPUs each run gets --num-gpus devices of its own")
    ap.add_argument("--threads", type=int, default=None,
                    help="on a CPU: threads of all the local runs together (default: every "
                         "core), shared out among the runs and their processes")
    ap.add_argument("--dry-run", action="store_true", help="list the plan, run nothing")
    ap.add_argument("--slurm", action="store_true", help="submit through submitit")
    ap.add_argument("--array", action="store_true", help="with --slurm: one job array")
    ap.add_argument("--cluster", default=None, choices=[None, "slurm", "local"],
                    help="with --slurm: submitit's executor (default: SLURM when available; "
                         "local: jobs on this machine, with the same preemption requeue)")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--cpus-per-task", type=int, default=10, help="with --slurm: per GPU")
    ap.add_argument("--timeout-min", type=int, default=4320)
    add_console_flags(ap)
    add_process_flags(ap)  # also given to every run
    zoo.add_zoo_flags(ap)  # also given to every run
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return ap


def main(argv=None):
    """The suite (in-process: tools.demo calls it)."""
    return run(get_parser().parse_args(argv))


def run(args):
    """Plan, then run or submit."""
    console = console_from_args(args)
    seeds = ([int(s) for s in args.seeds.split(",")] if "," in args.seeds
             else list(range(int(args.seeds))))
    zoo_opts = zoo.options_from_args(args)
    planned = plan(args.tasks.split(), args.weights.split(), seeds, args.scale, args.runs,
                   zoo_opts)
    for p in planned:
        if console.quiet and not args.dry_run:
            break  # the quiet console: the counts below and one progress bar
        print(f"{p.action:>6}  {p.task:<26} {p.weights_name:<14} seed {p.seed:<3} {p.run_dir}"
              f"  ({p.why})")
    counts = {a: sum(p.action == a for p in planned) for a in ("start", "resume", "skip")}
    print(f"[suite] {len(planned)} runs: {counts['start']} to start, {counts['resume']} to "
          f"resume, {counts['skip']} complete")
    if args.dry_run:
        return 0
    # published checkpoints: fetched and converted once here, before any run starts (a run
    # would do it too, under the same lock; a bad name or a failed download shows once)
    for spec in dict.fromkeys(p.weights_spec for p in planned if p.action != "skip"):
        prepare_weights(spec, zoo_opts)
    if args.slurm:
        submit_slurm(planned, args.runs, args)
        return 0
    return 1 if run_local(planned, args.runs, args.num_gpus, args.opts, args.jobs,
                          args.threads, console, args.omp_wait_policy) else 0


if __name__ == "__main__":
    args = get_parser().parse_args()
    apply_omp_wait_policy(args.omp_wait_policy)
    sys.exit(entry_point(run, args))
