"""`make demo`: the whole pipeline on generated data, on a CPU, in minutes.

generate data -> MoCo pretraining -> supervised baseline (same budget) -> convert both ->
transfer (MoCo, supervised, random init; 2 seeds each; smoke scale) -> results table + report.

    python -m tools.demo [--out demo_out] [--iters 100] [--seeds 2] [--small]

Everything is synthetic and small: the numbers show that the pipeline works and how it reports,
not how MoCo transfers. Whatever they are, the table reports them as measured.
"""
import argparse
import os
import sys
import time

from pretrain import main_moco, main_supervised, synthetic


def log(msg):
    print(f"\n[demo] {msg}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--iters", type=int, default=100, help="transfer iterations per run")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--small", action="store_true", help="an even smaller run (CI)")
    args = p.parse_args(argv)
    t0 = time.time()
    from transfer.datasets import dataset_root

    root = os.path.join(dataset_root(), "synthetic")
    log(f"1/6 data: generating (or reusing) the synthetic dataset under {root}")
    synthetic.generate(root)

    log("2/6 MoCo v2 pretraining (embedded default: ResNet-18, 64 px)")
    moco_args = main_moco.get_args_parser().parse_args([])
    moco_args.data = os.path.join(root, "unlabeled")
    moco_args.output = os.path.join(args.out, "pretrain", "moco")
    for k, v in main_moco.EMBEDDED_DEFAULTS.items():
        setattr(moco_args, k, v)
    moco_args.print_freq = 8
    if args.small:
        moco_args.epochs, moco_args.schedule = 2, [1]
    moco_args.embedded = True
    moco_ckpt = main_moco.main(moco_args)

    log("3/6 supervised baseline on the labeled folder, same budget")
    sup_args = main_supervised.get_args_parser().parse_args([])
    sup_args.data = os.path.join(root, "labeled")
    sup_args.output = os.path.join(args.out, "pretrain", "supervised")
    sup_args.epochs = moco_args.epochs
    sup_args.arch, sup_args.batch_size = moco_args.arch, moco_args.batch_size
    sup_args.image_size, sup_args.workers = moco_args.image_size, moco_args.workers
    sup_ckpt = main_supervised.main(sup_args)

    log("4/6 converting both checkpoints to detectron2's format")
    from convert.to_detectron2 import main as convert_main

    weights_dir = os.path.join(args.out, "weights")
    os.makedirs(weights_dir, exist_ok=True)
    moco_pkl = os.path.join(weights_dir, "moco.pkl")
    sup_pkl = os.path.join(weights_dir, "supervised.pkl")
    for src, dst in ((moco_ckpt, moco_pkl), (sup_ckpt, sup_pkl)):
        if convert_main([src, dst]) != 0:
            raise SystemExit(f"conversion of {src} failed")

    iters = 10 if args.small else args.iters
    log(f"5/6 transfer: synthetic_mask_fpn_1k at smoke scale ({iters} iterations), "
        f"MoCo / supervised / random init x {args.seeds} seeds")
    from tools.suite import main as suite_main

    runs = os.path.join(args.out, "runs")
    rc = suite_main(["--tasks", "synthetic_mask_fpn_1k",
                     "--weights", f"moco={moco_pkl} supervised={sup_pkl} random",
                     "--seeds", str(args.seeds), "--scale", "smoke", "--runs", runs,
                     "SOLVER.MAX_ITER", str(iters)])

    log("6/6 results")
    from results.__main__ import main as results_main

    results_main(["--runs", runs, "--out", os.path.join(args.out, "results"), "--decimals", "2"])
    took = time.time() - t0
    log(f"done in {took / 60:.1f} min. Where everything went:\n"
        f"  pretraining   {os.path.join(args.out, 'pretrain')}\n"
        f"  weights       {weights_dir}\n"
        f"  transfer runs {runs}\n"
        f"  tables        {os.path.join(args.out, 'results', 'results.md')}\n"
        f"  report        {os.path.join(args.out, 'results', 'report.html')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
