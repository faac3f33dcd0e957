"""The cost of each contrastive mechanism, side by side (`make bench ARGS="--only mechanisms"`):
s/iter and memory of moco, end-to-end and memory bank at the same batch, their ratios against
the paper's, and MoCHi's overhead against MoCo v2 for three (N, s, s') settings.

Every variant is one training step of `pretrain.main_moco` (ResNet-50 v2 head, 224 px, the
default precision, K = 65536; the memory bank at ImageNet-1k's size, 1,281,167 entries), timed
in a process of its own, so that its peak resident memory is its own. MoCo runs first and last:
the spread of its two runs is the noise floor of the machine at that time.

    python -m tools.bench_mechanisms [--out BENCHMARKS.md] [--steps 4] [--batch 32]
(also a section of `make bench`, `--only mechanisms`).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from pretrain import engine, main_moco
from pretrain.mochi import hard_negative_mixtures, parse_setting
from results.paper_numbers import PRETRAINING_COST
from tools.benchmarking import machine, publish

IMAGENET_TRAIN_IMAGES = 1_281_167  # the memory bank's entries
# the 100-epoch settings the MoCHi paper prints VOC rows for (PROTOCOL.md section 7)
MOCHI_SETTINGS = ("256,512,0", "256,512,256", "128,1024,512")
VARIANTS = {"moco": [], "end_to_end": ["--mechanism", "end_to_end"],
            "memory_bank": ["--mechanism", "memory_bank"],
            **{parse_setting(s).name(): ["--mochi", s, "--mochi-warmup-epochs", "0"]
               for s in MOCHI_SETTINGS}}


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant, steps, batch, splits):
    """In this process: {s_per_iter, rss_before_mb, peak_rss_mb, losses, precision}."""
    args = main_moco.get_args_parser().parse_args(
        ["--data", "unused", "--arch", "resnet50", "--batch-size", str(batch), "--shuffle-groups",
         str(splits), *VARIANTS[variant]])
    args = main_moco.resolve_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, dtype, use_scaler, channels_last = engine.resolve_precision("auto", device)
    torch.manual_seed(0)
    model = main_moco.build_model(args, 1, IMAGENET_TRAIN_IMAGES).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=1e-4)
    scaler = engine.make_scaler(use_scaler, device)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, 224, 224, generator=g),
             torch.randn(batch, 3, 224, 224, generator=g)) for _ in range(2)]
    draws = torch.Generator(device=device).manual_seed(1)
    before = rss_mb() if device.type == "cpu" else torch.cuda.memory_allocated() / 2**20
    times, losses = [], []
    for i in range(steps + 1):
        index = torch.randperm(IMAGENET_TRAIN_IMAGES, generator=g)[:batch]
        t = time.perf_counter()
        loss, _, _ = main_moco.train_step(model, torch.nn.CrossEntropyLoss(), opt, scaler,
                                          *data[i % 2], device, dtype, channels_last,
                                          torch.Generator().manual_seed(i), index, draws)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = rss_mb() if device.type == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    return {"s_per_iter": statistics.median(times), "rss_before_mb": before,
            "peak_rss_mb": peak, "losses": losses, "precision": precision}


def mixing_ms(setting, batch, K=65536, dim=128, repeats=20):
    """Milliseconds of MoCHi's mixing alone (top-N, draws, mixtures) for one step's queries."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(dim, K, generator=g), dim=0)
    l_neg = q @ queue
    parsed, draws = parse_setting(setting), torch.Generator().manual_seed(1)
    hard_negative_mixtures(q, queue, l_neg, parsed, draws)
    t = time.perf_counter()
    for _ in range(repeats):
        hard_negative_mixtures(q, queue, l_neg, parsed, draws)
    return (time.perf_counter() - t) / repeats * 1000


def run_child(variant, steps, batch, splits):
    out = subprocess.run([sys.executable, "-m", "tools.bench_mechanisms", "--child", variant,
                          "--steps", str(steps), "--batch", str(batch), "--splits", str(splits)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


TITLE = "### Contrastive mechanisms side by side: cost of one step (issue #27)"


def section(steps, batch, splits):
    """The section's lines, measured: TITLE, then the tables and how they were measured."""
    order = ["moco", "end_to_end", "memory_bank", *list(VARIANTS)[3:], "moco"]
    res = {}
    for v in order:
        res.setdefault(v, []).append(run_child(v, steps, batch, splits))
        print(f"[bench] {v}: {res[v][-1]['s_per_iter']:.2f} s/iter", flush=True)
    moco = res["moco"]
    base_t = statistics.mean(r["s_per_iter"] for r in moco)
    base_m = statistics.mean(r["peak_rss_mb"] - r["rss_before_mb"] for r in moco)
    noise = abs(moco[0]["s_per_iter"] - moco[1]["s_per_iter"]) / base_t
    paper = {k.split(",")[0]: v for k, v in PRETRAINING_COST.items() if k.endswith("batch 256")}
    paper_mem = paper["end-to-end"]["gb_per_gpu"] / paper["MoCo"]["gb_per_gpu"]
    paper_time = paper["end-to-end"]["hours"] / paper["MoCo"]["hours"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [TITLE, "", f"{machine()}; measured {time.strftime('%Y-%m-%d %H:%M')}. ResNet-50 "
             f"with the v2 head, 224 px, batch {batch}, {device}, {moco[0]['precision']}.", "",
             "| mechanism | s/iter | x MoCo | peak RSS (MB) | training memory (MB) | x MoCo | "
             "paper (8 V100, batch 256) |", "|---|---|---|---|---|---|---|"]
    paper_cells = {"moco": "5.0 GB/GPU, 53 h", "end_to_end":
                   f"7.4 GB/GPU, 65 h: **{paper_mem:.2f}x** memory, **{paper_time:.2f}x** time",
                   "memory_bank": "not printed"}
    for v in ("moco", "end_to_end", "memory_bank"):
        r = res[v]
        t = statistics.mean(x["s_per_iter"] for x in r)
        mem = statistics.mean(x["peak_rss_mb"] - x["rss_before_mb"] for x in r)
        peak = statistics.mean(x["peak_rss_mb"] for x in r)
        lines.append(f"| {v} | {t:.2f} | {t / base_t:.2f} | {peak:.0f} | {mem:.0f} | "
                     f"{mem / base_m:.2f} | {paper_cells[v]} |")
    lines += ["", "| MoCHi (N, s, s') | s/iter | overhead vs MoCo v2 | mixing alone (ms/iter) |",
              "|---|---|---|---|"]
    for setting in MOCHI_SETTINGS:
        name = parse_setting(setting).name()
        t = res[name][0]["s_per_iter"]
        lines.append(f"| ({setting.replace(',', ', ')}) | {t:.2f} | {100 * (t / base_t - 1):+.1f}% "
                     f"| {mixing_ms(setting, batch):.1f} |")
    lines += ["", f"Each row: one process, median of {steps} steps after one warm-up (query and "
              "key forward, backward, SGD; the memory bank's 1,281,167 entries, MoCHi mixing "
              "from the first step); K = 65536; shuffle-BN groups "
              f"{splits}. Training memory = peak RSS minus the RSS before the first step (model, "
              "optimizer state, bank and the two input batches already allocated); the paper's "
              "figures are GPU memory per GPU and total hours, compared as ratios. MoCo ran "
              f"first and last: {moco[0]['s_per_iter']:.2f} and {moco[1]['s_per_iter']:.2f} "
              f"s/iter, a {100 * noise:.1f}% noise floor for the time ratios.", ""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--splits", type=int, default=8, help="shuffle-BN groups (8 GPUs' layout)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch, args.splits)))
        return 0
    lines = section(args.steps, args.batch, args.splits)
    lines.append(f"Command: `python -m tools.bench_mechanisms --steps {args.steps} --batch "
                 f"{args.batch}` (`make bench-mechanisms`; also in `make bench`).")
    publish(args.out, "\n".join(lines) + "\n", "bench_mechanisms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
