"""Plan and run every task x weights x seed: ``make suite TASKS=... WEIGHTS=... SEEDS=5``.

    python -m tools.suite --tasks "voc_frcnn_c4_24k" --weights "moco=a.pkl supervised random" \
        --seeds 5 [--scale smoke] [--dry-run] [--slurm --partition P --gpus-per-node 8 ...]

Complete runs are skipped; interrupted or failed ones are started again and resume from their
last readable checkpoint (train_net resumes by itself, exactly: see the README's "Resume and
preemption"); the rest start fresh. A run killed during its final evaluation is evaluated
again from model_final.pth without training. So a suite killed at any moment and started again
runs only what is missing or incomplete. Locally the runs go one after another, or --jobs N at
a time (on a CPU each gets 1/N of the cores: small runs use 2 one-thread processes better than
one two-thread process, see BENCHMARKS.md); with --slurm
each run is one submitit job (or one job array with --array), and a job that SLURM preempts is
requeued and resumes (--cluster local: submitit's local executor, same requeue logic).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from results.collect import read_run
from transfer import console
from transfer.config import setup_cfg
from transfer.configs import known_tasks
from transfer.run_dir import run_dir
from transfer.weights import parse_weights


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

    def command(self, runs_root, num_gpus=1, extra=(), dist_url=None):
        """train_net's command line; the KEY VALUE overrides `extra` come last."""
        return [sys.executable, "-m", "transfer.train_net", "--task", self.task, "--weights",
                self.weights_spec, "--seed", str(self.seed), "--scale", self.scale,
                "--runs", runs_root, "--num-gpus", str(num_gpus),
                *(["--dist-url", dist_url] if dist_url else []), *extra]


def plan(tasks, weights, seeds, scale, runs_root):
    """Every (task, weights, seed) with what to do about it."""
    unknown = [t for t in tasks if t not in known_tasks()]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}. Known tasks: {', '.join(known_tasks())}")
    planned = []
    for task in tasks:
        for spec in weights:
            name = parse_weights(spec)[0]
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
                planned.append(PlannedRun(task, spec, name, seed, scale, d, action, why))
    return planned


def run_local(planned, runs_root, num_gpus=1, extra=(), jobs=1):
    """Run what is not complete, `jobs` runs at a time; returns the number of failed runs."""
    todo = [p for p in planned if p.action != "skip"]
    if not todo:
        return 0
    if console.quiet():
        return _run_local_quiet(todo, runs_root, num_gpus, extra, jobs)
    failures = 0

    def started(i, p):
        print(f"[suite] ({i + 1}/{len(todo)}) {p.action}: {p.task} / {p.weights_name} / "
              f"seed {p.seed}", flush=True)
        return subprocess.Popen(p.command(runs_root, num_gpus, extra), env=job_env(jobs))

    for _, p, proc in _pool(todo, started, jobs):
        if proc.returncode != 0:
            failures += 1
            print(f"[suite] run failed (exit {proc.returncode}); see {p.run_dir}/status.json",
                  flush=True)
    return failures


def job_env(jobs):
    """The environment of one of `jobs` concurrent local runs: each gets an equal share of the
    cores for its intra-op threads, unless OMP_NUM_THREADS already says how many."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _pool(todo, start, jobs, poll=None):
    """Start `start(i, planned_run) -> Popen` for every run, at most `jobs` at a time; yields
    (i, planned_run, finished Popen) as they end. `poll(running)` is called while waiting. On an
    exception (Ctrl-C included) the running processes are terminated: they resume next time."""
    pending, running = list(enumerate(todo)), []
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                i, p = pending.pop(0)
                running.append((i, p, start(i, p)))
            time.sleep(0.5)
            for r in [r for r in running if r[2].poll() is not None]:
                running.remove(r)
                yield r
            if poll is not None:
                poll(running)
    finally:
        for _, _, proc in running:
            proc.terminate()
        for _, _, proc in running:
            proc.wait()


def _max_iter(p, extra):
    try:
        return setup_cfg(p.task, p.weights_spec, seed=p.seed, scale=p.scale,
                         overrides=list(extra), output=p.run_dir).SOLVER.MAX_ITER
    except Exception:  # the run itself reports a bad config
        return 1


def _read_progress(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _run_local_quiet(todo, runs_root, num_gpus, extra, jobs):
    """The quiet console (transfer/console.py): one progress bar over every iteration of every
    run; each run's terminal output goes to <run>/console.log, its log to <run>/log.txt."""
    iters = [_max_iter(p, extra) for p in todo]
    failures, finished = 0, 0
    bar = console.bar(sum(iters), f"fine-tuning {len(todo)} runs"
                      + (f", {jobs} at a time" if jobs > 1 else ""), unit="it")
    with tempfile.TemporaryDirectory() as tmp:
        def progress(i):
            return os.path.join(tmp, f"run{i}")

        def start(i, p):
            os.makedirs(p.run_dir, exist_ok=True)
            with open(os.path.join(p.run_dir, "console.log"), "a") as out:
                return subprocess.Popen(p.command(runs_root, num_gpus, extra), stdout=out,
                                        stderr=subprocess.STDOUT,
                                        env=dict(job_env(jobs),
                                                 **{console.PROGRESS_ENV: progress(i)}))

        def poll(running):
            done = finished + sum(min(_read_progress(progress(i)), iters[i])
                                  for i, _, _ in running)
            bar.set_postfix_str(", ".join(f"{p.weights_name} seed {p.seed}"
                                          for _, p, _ in running), refresh=False)
            bar.update(max(0, done - bar.n))

        for i, p, proc in _pool(todo, start, jobs, poll):
            finished += iters[i]
            if proc.returncode != 0:
                failures += 1
                bar.write(f"[suite] {p.task} / {p.weights_name} / seed {p.seed} failed (exit "
                          f"{proc.returncode}); see {p.run_dir}/console.log and status.json")
        bar.update(max(0, finished - bar.n))
    bar.close()
    return failures


class _SlurmRun:
    """A submitit callable: runs one transfer run; on preemption it is requeued and resumes.

    When the scheduler signals a preemption, submitit calls ``checkpoint`` and exits; the
    exit interrupts ``subprocess.run``, which kills the training process. Nothing is saved
    then: the requeued job resumes from the run's last checkpoint, exactly."""

    def __init__(self, planned, runs_root, num_gpus, extra):
        self.planned, self.runs_root, self.num_gpus, self.extra = planned, runs_root, \
            num_gpus, list(extra)

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        cmd = self.planned.command(self.runs_root, self.num_gpus, self.extra,
                                   dist_url=f"tcp://{env.hostnames[0]}:29500")
        subprocess.run(cmd, check=True)
        return self.planned.run_dir

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)  # resumes from its run directory


def submit_slurm(planned, runs_root, args):
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(runs_root, "slurm", "%j"),
                                     cluster=args.cluster)
    executor.update_parameters(
        nodes=1, gpus_per_node=args.gpus_per_node, tasks_per_node=1,
        cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min,
        slurm_partition=args.partition, name="moco-transfer")
    todo = [p for p in planned if p.action != "skip"]
    calls = [_SlurmRun(p, runs_root, args.gpus_per_node, args.opts) for p in todo]
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
                    help="space-separated: NAME=path.pkl, path.pkl, supervised, random")
    ap.add_argument("--seeds", default="1", help="a count N (seeds 0..N-1) or a list '0,3,7'")
    ap.add_argument("--scale", default="full")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1,
                    help="local runs at a time; on a CPU the cores are shared out among them")
    ap.add_argument("--dry-run", action="store_true", help="list the plan, run nothing")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="the runs' full logs on the terminal (default when not interactive)")
    ap.add_argument("--slurm", action="store_true", help="submit through submitit")
    ap.add_argument("--array", action="store_true", help="with --slurm: one job array")
    ap.add_argument("--cluster", default=None, choices=[None, "slurm", "local"],
                    help="with --slurm: submitit's executor (default: SLURM when available; "
                         "local: jobs on this machine, with the same preemption requeue)")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--cpus-per-task", type=int, default=80)
    ap.add_argument("--timeout-min", type=int, default=4320)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return ap


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.verbose:
        os.environ["MOCO_TRANSFER_VERBOSE"] = "1"

    seeds = ([int(s) for s in args.seeds.split(",")] if "," in args.seeds
             else list(range(int(args.seeds))))
    planned = plan(args.tasks.split(), args.weights.split(), seeds, args.scale, args.runs)
    for p in planned:
        if console.quiet() and not args.dry_run:
            break  # the quiet console: the counts below and one progress bar
        print(f"{p.action:>6}  {p.task:<26} {p.weights_name:<14} seed {p.seed:<3} {p.run_dir}"
              f"  ({p.why})")
    counts = {a: sum(p.action == a for p in planned) for a in ("start", "resume", "skip")}
    print(f"[suite] {len(planned)} runs: {counts['start']} to start, {counts['resume']} to "
          f"resume, {counts['skip']} complete")
    if args.dry_run:
        return 0
    if args.slurm:
        submit_slurm(planned, args.runs, args)
        return 0
    return 1 if run_local(planned, args.runs, args.num_gpus, args.opts, args.jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
