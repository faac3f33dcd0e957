"""`make demo`: the whole pipeline on generated data, on a CPU, in minutes, with a result that
means something: MoCo-pretrained weights against random init (and the supervised baseline) on a
low-data detection task, several seeds each, compared with Welch's t-test.

generate data -> MoCo pretraining (v1's recipe, unlabelled object images) -> supervised
baseline (labelled crops, same budget) -> convert both -> fine-tune Faster R-CNN R18-FPN on a
few labelled scenes (synthetic_frcnn_fpn_1k at smoke scale: MoCo and random init x 6 seeds,
supervised x 2) -> results tables (mean +- std, deltas, Welch p-values) + report.

    python -m tools.demo [--out demo_out] [--seeds 6] [--supervised-seeds 2] [--iters N]
                         [--epochs N] [--small] [-v]
    python -m tools.demo --control-random-moco   # the control: MoCo weights replaced by random
    python -m tools.demo --mechanisms "moco end_to_end memory_bank mochi"  # demo_mechanisms.py

The console shows one progress bar per stage; every log goes to files under --out (`-v`, or
`make demo V=1`, prints them instead). Whatever the numbers are, the table reports them
as measured.

The control (not run in CI) writes randomly initialised ResNet weights in the MoCo checkpoint
format, converts them with the same converter into the same .pkl format (same keys, same
metadata) and runs the same comparison under <out>/control: with the pretrained weights gone,
the MoCo gain must disappear, which shows the comparison would catch a broken chain.
"""
import argparse
import contextlib
import copy
import os
import sys
import time

import torch
import torchvision

from convert import safe_load
from convert.machine import cpu_count
from convert.runtime import add_process_flags, apply_omp_wait_policy
from convert.to_detectron2 import main as convert_main
from pretrain import engine, main_moco, main_supervised, synthetic
from results.__main__ import main as results_main
from results.collect import collect
from results.report import slug
from results.tables import format_difference
from tools.demo_mechanisms import convert_all, parse_mechanisms, pretrain_mechanisms
from tools.suite import main as suite_main
from transfer.config import load_task_config
from transfer.console import Console, console_flags, quiet_stdout
from transfer.datasets import dataset_root

DEMO_TASK = "synthetic_frcnn_fpn_1k"
# fine-tuning schedule of the demo (smoke scale of DEMO_TASK, these overrides last)
FINETUNE = dict(iters=80, batch=4, lr=0.01)
SMALL = dict(epochs=1, iters=12, sup_epochs=1)  # --small (CI): the pipeline, not the result


def say(msg):
    print(f"[demo] {msg}", flush=True)


def random_moco_checkpoint(reference, path, seed=12345):
    """A MoCo-format checkpoint (the keys, arch and layout of `reference`) whose encoder
    weights are a fresh random initialisation: the control's stand-in for a broken chain."""
    ref = safe_load.load_torch(reference)
    torch.manual_seed(seed)
    rnd = getattr(torchvision.models, ref["arch"])().state_dict()
    state = {}
    for k, v in ref["state_dict"].items():
        for enc in ("module.encoder_q.", "module.encoder_k."):
            if k.startswith(enc) and k[len(enc):] in rnd and \
                    rnd[k[len(enc):]].shape == v.shape:
                v = rnd[k[len(enc):]].clone()
        state[k] = v
    ckpt = dict(ref, state_dict=state, control="random init written in the MoCo format")
    ckpt.pop("optimizer", None)
    engine.save_atomic(ckpt, path)
    return path


def finished(ckpt, epochs):
    """Whether a pretraining checkpoint exists and has trained all `epochs`."""
    if not os.path.isfile(ckpt):
        return False
    return safe_load.load_torch(ckpt).get("epoch", 0) >= epochs


def as_argv(options):
    """Command-line options from keyword values: {'batch_size': 64, 'schedule': [8, 10]} ->
    ['--batch-size', '64', '--schedule', '8', '10']."""
    argv = []
    for key, value in options.items():
        argv.append("--" + key.replace("_", "-"))
        argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


def convert(src, dst, log_path):
    with quiet_stdout(log_path):
        if convert_main([src, dst]) != 0:
            raise SystemExit(f"conversion of {src} failed; see {log_path}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seeds", type=int, default=6,
                   help="fine-tuning seeds of the MoCo and random-init arms (and --mechanisms): "
                        "the comparison the demo is about")
    p.add_argument("--supervised-seeds", type=int, default=2,
                   help="fine-tuning seeds of the supervised arm (6 + 6 + 2 runs, two at a "
                        "time: what fits 10 minutes on 2 cores)")
    p.add_argument("--iters", type=int, default=None, help="fine-tuning iterations per run")
    p.add_argument("--epochs", type=int, default=None, help="MoCo pretraining epochs")
    p.add_argument("--small", action="store_true", help="a much smaller run (CI)")
    p.add_argument("--control-random-moco", action="store_true",
                   help="replace the converted MoCo weights by random init in the same format")
    p.add_argument("--mechanisms", default="moco",
                   help="also pretrain and compare these (end_to_end memory_bank mochi)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="full logs on the terminal (default: one progress bar per stage)")
    add_process_flags(p)  # also given to the programs the demo starts
    return p


def main(argv=None):
    return run(get_parser().parse_args(argv))


def run(args):
    mechanisms = parse_mechanisms(args.mechanisms)
    console = Console(quiet=not args.verbose)
    quiet = console.quiet
    t0, c0 = time.time(), os.times()

    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    root = os.path.join(dataset_root(), "synthetic")
    say(f"1/6 data: synthetic shapes under {root} ({synthetic.DEFAULTS['n_unlabeled']} "
        f"unlabelled object images, {synthetic.DEFAULTS['n_train']} labelled training scenes, "
        f"{synthetic.DEFAULTS['n_val']} val)")
    synthetic.generate(root, quiet=True)

    recipe = dict(main_moco.EMBEDDED_DEFAULTS)
    if args.epochs:
        recipe["epochs"] = args.epochs
    if args.small:
        recipe["epochs"] = SMALL["epochs"]
    moco_args = main_moco.get_args_parser().parse_args(
        ["--data", os.path.join(root, "unlabeled"), "--output",
         os.path.join(out, "pretrain", "moco"), "--print-freq", "8", *as_argv(recipe)]
        + ["--quiet"] * quiet)
    say(f"2/6 MoCo {moco_args.version} pretraining: {moco_args.arch}, {moco_args.image_size} px, "
        f"{moco_args.epochs} epochs (log: {moco_args.output}/log.txt)")
    moco_ckpt = main_moco.main(copy.copy(moco_args))  # resolved in place; the mechanisms
    # start from the options as given (MoCHi's v2 gets v2's own defaults)
    other_ckpts = ({} if args.control_random_moco
                   else pretrain_mechanisms(mechanisms, moco_args, say))

    sup_args = main_supervised.get_args_parser().parse_args(
        ["--data", os.path.join(root, "labeled"), "--output",
         os.path.join(out, "pretrain", "supervised"), "--epochs",
         str(SMALL["sup_epochs"] if args.small else main_moco.EMBEDDED_SUPERVISED_EPOCHS),
         *as_argv({k: recipe[k]
                   for k in ("arch", "batch_size", "image_size", "workers", "precision")})]
        + ["--quiet"] * quiet)
    say(f"3/6 supervised baseline on the labelled crops ({sup_args.epochs} epochs)")
    sup_ckpt = os.path.join(sup_args.output, "checkpoint_last.pth.tar")
    if not finished(sup_ckpt, sup_args.epochs):  # a finished one is reused (a second demo)
        sup_ckpt = main_supervised.main(sup_args)

    weights_dir = os.path.join(out, "weights")
    os.makedirs(weights_dir, exist_ok=True)
    moco_pkl = os.path.join(weights_dir, "moco.pkl")
    sup_pkl = os.path.join(weights_dir, "supervised.pkl")
    runs = os.path.join(out, "runs")
    results_dir = os.path.join(out, "results")
    if args.control_random_moco:
        control = os.path.join(out, "control")
        weights_dir = os.path.join(control, "weights")
        os.makedirs(weights_dir, exist_ok=True)
        moco_src = random_moco_checkpoint(moco_ckpt, os.path.join(control, "random_moco.pth.tar"))
        moco_pkl = os.path.join(weights_dir, "moco.pkl")
        runs, results_dir = os.path.join(control, "runs"), os.path.join(control, "results")
        say("4/6 CONTROL: the MoCo weights are replaced by random init in the MoCo format, "
            "converted the same way")
    else:
        moco_src = moco_ckpt
        say("4/6 converting both checkpoints to detectron2's format")
    for src, dst in ((moco_src, moco_pkl), (sup_ckpt, sup_pkl)):
        convert(src, dst, os.path.join(logs, "convert.txt"))
    other_weights = convert_all(other_ckpts, weights_dir, lambda src, dst: convert(
        src, dst, os.path.join(logs, "convert.txt")))

    iters = SMALL["iters"] if args.small else (args.iters or FINETUNE["iters"])
    # on a CPU, two runs side by side with half the cores each (BENCHMARKS.md)
    jobs = 1 if torch.cuda.is_available() else min(2, cpu_count())
    say(f"5/6 fine-tuning {DEMO_TASK} ({iters} iterations, batch {FINETUNE['batch']}): "
        f"MoCo and random init x {args.seeds} seeds, supervised x "
        f"{args.supervised_seeds}, {jobs} at a time "
        f"(logs: {runs})")

    common = ["--tasks", DEMO_TASK, "--jobs", str(jobs), "--scale", "smoke", "--runs", runs,
              *console_flags(console), "--omp-wait-policy", args.omp_wait_policy,
              "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", str(FINETUNE["batch"]),
              "SOLVER.BASE_LR", str(FINETUNE["lr"])]
    # MoCo and random first: the comparison the demo is about
    rc = suite_main(["--weights", " ".join([f"moco={moco_pkl}", *other_weights, "random"]),
                     "--seeds", str(args.seeds), *common])
    rc = suite_main(["--weights", f"supervised={sup_pkl}", "--seeds",
                     str(args.supervised_seeds), *common]) or rc

    say("6/6 results" + (" (CONTROL: 'moco' is random init)" if args.control_random_moco
                         else ""))

    with quiet_stdout(os.path.join(logs, "results.txt")) if quiet else \
            contextlib.nullcontext():
        results_main(["--runs", runs, "--out", results_dir, "--decimals", "2"])
    results_md = os.path.join(results_dir, "results.md")
    print_section(results_md, lambda title: "synthetic" in title.lower())
    print_pvalues(runs, list(load_task_config(DEMO_TASK).MOCO_TRANSFER.METRICS))
    print_section(results_md, lambda title: title == "## Cost")
    curves = os.path.join(results_dir, "plots", f"{slug(DEMO_TASK + '_smoke')}_loss.png")
    took, c1 = time.time() - t0, os.times()
    cpu = (c1.user + c1.system + c1.children_user + c1.children_system
           - c0.user - c0.system - c0.children_user - c0.children_system)
    say(f"done in {took / 60:.1f} min ({cpu / 60:.1f} CPU-min, load average "
        f"{os.getloadavg()[0]:.1f}). Where everything went:\n"
        f"  pretraining   {os.path.join(out, 'pretrain')} (log.txt, metrics.json)\n"
        f"  weights       {weights_dir}\n"
        f"  transfer runs {runs} (per run: log.txt, metrics.json, results.json)\n"
        f"  tables        {os.path.join(results_dir, 'results.md')} (+ the cost table)\n"
        f"  loss curves   {curves} (every iteration, each seed)\n"
        f"  report        {os.path.join(results_dir, 'report.html')}\n"
        f"  other output  {logs}")
    return rc


def print_section(results_md, wanted):
    """The first section of results.md whose heading `wanted` accepts (the demo task's table
    with its intervals and p-values; the cost table), as written."""
    try:
        text = open(results_md).read()
    except OSError:
        say(f"no results table at {results_md}")
        return
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#")
                  and wanted(line)), None)
    if start is None:
        print(text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")
                and lines[i].count("#") <= lines[start].count("#")), len(lines))
    print("\n".join(lines[start:end]).rstrip(), flush=True)


def print_pvalues(runs_root, metrics):
    """Each difference between the arms with its 95% Welch interval and Welch's two-sided
    p-value, one line per metric (the task's main metric first), with the results package's
    own statistics (results.tables.format_difference; the table's deltas are to supervised
    only)."""
    df = collect(runs_root)
    done = df[df["state"] == "complete"]
    for i, metric in enumerate(metrics):
        vals = {w: [float(m[metric]) for m in done[done["weights"] == w]["metrics"]]
                for w in ("moco", "supervised", "random")}
        parts = []
        for a, b in (("moco", "random"), ("supervised", "random"), ("moco", "supervised")):
            if vals[a] and vals[b]:
                parts.append(f"{a} - {b}: {format_difference(vals[a], vals[b], 2)}")
        say(f"Welch two-sided p-values over seeds, {metric}"
            + (" (the task's main metric)" if i == 0 else "") + ": " + "; ".join(parts))


if __name__ == "__main__":
    args = get_parser().parse_args()
    apply_omp_wait_policy(args.omp_wait_policy)
    sys.exit(run(args))
