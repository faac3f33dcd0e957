"""MoCo v1/v2 pretraining, and the paper's other contrastive mechanisms (end-to-end, memory
bank) and MoCHi on the same stack (--mechanism, --mochi; pretrain/mechanisms.py).

One process (CPU or one GPU):   python -m pretrain.main_moco --data /path/to/imagenet/train
Several GPUs on one node:       torchrun --nproc_per_node 8 -m pretrain.main_moco --data ...
SLURM cluster:                  python -m pretrain.submit --nodes 1 --gpus-per-node 8 --data ...
No --data: the embedded synthetic dataset, a small schedule that finishes on a CPU in minutes
and MoCo v1's recipe (EMBEDDED_DEFAULTS, `make demo`'s).

Defaults are the paper's recipe (PROTOCOL.md section 1): ResNet-50, K=65536, m=0.999, SGD lr 0.03
per 256 images (scaled linearly with the batch), wd 1e-4, 200 epochs; v1: T=0.07, steps at 120
and 160; v2: MLP head, aug+, T=0.2, cosine schedule. Checkpoints are the reference format
({epoch, arch, state_dict: module.encoder_q.*, module.encoder_k.*, module.queue,
module.queue_ptr, optimizer}) plus what an exact resume needs; every mechanism writes its query
encoder as module.encoder_q.*, so the converter reads all of them as MoCo.
"""
import argparse
import json
import logging
import os

import torch
import torch.nn as nn
import torchvision

from convert import safe_load
from convert.errors import UserError
from convert.files import write_json_atomic
from convert.logs import restores_logging
from convert.machine import cpu_count
from convert.runtime import add_process_flags, program
from pretrain import engine, feed, loader, mechanisms
from pretrain.knn import knn_accuracy
from pretrain.memory_bank import BANK_MOMENTUM
from pretrain.mochi import DEFAULT_WARMUP_EPOCHS, parse_setting
from pretrain.synthetic import generate

logger = logging.getLogger("pretrain")

# The embedded default: a demonstration that learns something in ~2 minutes on 2 CPU cores, not
# the paper's schedule. MoCo v1's recipe, as in the MoCo paper's transfer tables (T = 0.07, no
# MLP head, no blur), at a constant lr 0.03: on these images, in 192 iterations, v2's recipe
# (MLP head, T = 0.2, cosine) left features that sort the labelled crops worse than a random
# network's, and v1's better (kNN, README "What the demo shows"). 48 px crops of the 64 px
# object-centric images, a short queue that fills in 8 iterations, a faster key encoder. fp32 on
# every machine: 'auto' would pick bf16 on CPUs that have it, and the demo's verdict must not
# depend on the CPU it lands on.
EMBEDDED_DEFAULTS = dict(arch="resnet18", version="v1", epochs=12, batch_size=64, moco_k=512,
                         moco_m=0.99, lr=0.03, image_size=48, schedule=[], shuffle_groups=4,
                         workers=1, precision="fp32")
# `make demo`'s supervised baseline: epochs over the 256 labelled crops (tools/demo.py)
EMBEDDED_SUPERVISED_EPOCHS = 15


def get_args_parser():
    p = argparse.ArgumentParser("MoCo pretraining", add_help=True,
                                epilog=mechanisms.help_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="image folder (ImageFolder tree or flat); "
                   "empty: the embedded synthetic dataset with a small schedule")
    p.add_argument("--output", default="", help="run directory (default: runs/pretrain/<name>)")
    p.add_argument("--arch", default=None, help="any torchvision ResNet (default resnet50)")
    p.add_argument("--version", choices=["v1", "v2"], default=None,
                   help="default v2 (v1 on the embedded data; v2 with --mochi)")
    p.add_argument("--mechanism", choices=sorted(mechanisms.MECHANISMS), default="moco",
                   help="the dictionary: moco (queue + momentum encoder), end_to_end (the "
                        "batch, through the query encoder), memory_bank (one entry per image); "
                        "see below")
    p.add_argument("--bank-momentum", type=float, default=BANK_MOMENTUM,
                   help="memory_bank: w <- normalise(m w + (1 - m) q) (default 0.5, Wu et al.'s "
                        "code; the MoCo paper gives none)")
    p.add_argument("--mochi", default="", metavar="N,S,S_PRIME",
                   help="MoCHi hard negative mixing on MoCo v2 (default off), e.g. 256,512,0")
    p.add_argument("--mochi-warmup-epochs", type=int, default=DEFAULT_WARMUP_EPOCHS,
                   help="epochs of plain MoCo before mixing starts (default 10, from a public "
                        "re-implementation; not printed in the seeds)")
    p.add_argument("--epochs", type=int, default=None, help="default 200")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 256)")
    p.add_argument("--lr", type=float, default=None, help="default 0.03 * batch / 256")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--schedule", type=int, nargs="*", default=None,
                   help="epochs at which lr x0.1 (v1; default 120 160)")
    p.add_argument("--cos", type=int, choices=[0, 1], default=None,
                   help="cosine schedule (default: 1 for v2, 0 for v1)")
    p.add_argument("--moco-dim", type=int, default=128)
    p.add_argument("--moco-k", type=int, default=None,
                   help="queue size; memory_bank: negatives per query (default 65536; unused "
                        "by end_to_end, whose dictionary is the batch)")
    p.add_argument("--moco-m", type=float, default=None, help="default 0.999")
    p.add_argument("--moco-t", type=float, default=None, help="default 0.07 (v1), 0.2 (v2)")
    p.add_argument("--image-size", type=int, default=None, help="crop size (default 224)")
    p.add_argument("--shuffle-groups", type=int, default=None,
                   help="one process: BN groups emulating shuffle BN on N GPUs (default 8)")
    p.add_argument("--workers", type=int, default=None, help="data workers per process "
                   "(default: with CUDA, the cores of this process but one; else 8)")
    p.add_argument("--augment-on", choices=feed.PATHS, default="device",
                   help="device: workers decode, crop and flip; colour jitter, grayscale, blur "
                        "and normalisation run in batches on the training device; cpu: the PIL "
                        "pipeline, every op in the workers (the reference)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                   help="auto: bf16 where fast (CPU with AMX/AVX512-BF16, recent GPUs), fp16 "
                        "on older GPUs; fp32 turns mixed precision and channels_last off (default: "
                        "auto; fp32 on the embedded data, so the demo computes alike on every CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: the run "
                   "directory's checkpoint_last.pth.tar, if any)")
    p.add_argument(safe_load.TRUST_FLAG, action="store_true", help=safe_load.TRUST_HELP)
    p.add_argument("--save-freq", type=int, default=10, help="keep checkpoint_XXXX every N epochs")
    p.add_argument("--save-every-iters", type=int, default=0,
                   help="also refresh checkpoint_last every N iterations (0: epoch ends only)")
    p.add_argument("--max-iters", type=int, default=0,
                   help="stop after this many iterations in total (tests, benchmarks)")
    p.add_argument("--print-freq", type=int, default=10)
    p.add_argument("--quiet", action="store_true",
                   help="log to <output>/log.txt only and show a progress bar")
    p.add_argument("--knn-data", default="", help="labeled folder for a kNN monitor")
    p.add_argument("--knn-freq", type=int, default=0, help="run the kNN monitor every N epochs")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="on a CPU: intra-op threads of all this machine's processes together, "
                        "shared out among them (default: every core)")
    return add_process_flags(p)


def resolve_args(args):
    """Fill paper defaults, or the embedded-default schedule when no --data is given."""
    embedded = not args.data
    base = dict(arch="resnet50", version="v2", epochs=200, batch_size=256, moco_k=65536,
                moco_m=0.999, lr=None, image_size=224, schedule=[120, 160], shuffle_groups=8,
                precision="auto")
    if args.mochi and args.version is None:
        args.version = "v2"  # MoCHi builds on MoCo v2
    if embedded:
        base.update(EMBEDDED_DEFAULTS)
        args.data = os.path.join(generate(os.path.join("datasets", "synthetic")), "unlabeled")
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.mochi:
        if args.mechanism != "moco" or args.version != "v2":
            raise UserError("--mochi builds on MoCo v2: use it with --mechanism moco "
                            "--version v2")
        try:
            parse_setting(args.mochi, args.moco_k)
        except ValueError as e:
            raise UserError(str(e)) from None
    v2 = args.version == "v2"
    args.mlp, args.aug_plus = v2, v2
    if args.cos is None:
        args.cos = int(v2)
    if args.moco_t is None:
        args.moco_t = 0.2 if v2 else 0.07
    if args.lr is None:
        args.lr = 0.03 * args.batch_size / 256
    if not args.output:
        args.output = os.path.join("runs", "pretrain", f"{mechanisms.run_name(args)}_"
                                   f"{args.version}_{args.arch}" + ("_embedded" * embedded))
    args.embedded = embedded
    return args


def build_model(args, world_size, num_images):
    """The --mechanism's model (pretrain/mechanisms.py) for a dataset of `num_images`."""
    arch = getattr(torchvision.models, args.arch, None)
    if arch is None or not args.arch.startswith(("resnet", "wide_resnet", "resnext")):
        raise UserError(f"--arch {args.arch}: not a torchvision ResNet (resnet18, resnet50, "
                        "wide_resnet50_2, resnext50_32x4d, ...)")
    groups = args.shuffle_groups if world_size == 1 else 1
    return mechanisms.build(args, arch, groups, num_images)


def train_step(model, criterion, optimizer, scaler, im_q, im_k, device, amp_dtype,
               channels_last, generator, index=None, draws=None):
    """One step: forward (queries, keys, dictionary update, in the model), backward, SGD.
    `generator` draws the key shuffle, `draws` the mechanism's random draws (memory-bank
    negatives, MoCHi's mixtures); `index`: the batch's dataset indices (memory bank)."""
    im_q = im_q.to(device, non_blocking=True)
    im_k = im_k.to(device, non_blocking=True)
    if channels_last:
        im_q = im_q.contiguous(memory_format=torch.channels_last)
        im_k = im_k.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits, labels = model(im_q, im_k, generator=generator, index=index, draws=draws)
    loss = criterion(logits.float(), labels)
    engine.optimizer_step(loss, optimizer, scaler)
    mechanisms.after_step(model)
    return loss, logits, labels


def draw_seed(seed, iteration):
    """The seed of the mechanism's draws (memory-bank negatives, MoCHi's mixtures) at
    `iteration`: the same on every process, and a function of the iteration alone, so a run
    resumed on another device type (or process count) draws from the same seed and the
    checkpoint holds no device-specific generator state."""
    return (seed * 1_000_003 + 17) * 10_000_019 + iteration


def checkpoint_dict(args, model, optimizer, scaler, epoch, iteration, batches_per_epoch, gen,
                    device):
    """The reference's keys, and what an exact resume needs, every state in a device-portable
    form: tensors as saved (safe_load maps them to the CPU), the generators' states as CPU
    ByteTensors (engine.rng_state; the key shuffle's generator lives on the CPU; the draws are
    reseeded every iteration, draw_seed)."""
    state = model.state_dict()
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        state = {"module." + k: v for k, v in state.items()}  # the reference's DDP key names
    return {
        "epoch": epoch,  # completed epochs, as the reference writes it
        "arch": args.arch,
        "state_dict": state,
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "batches_per_epoch": batches_per_epoch,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": engine.rng_state(device),
        "shuffle_generator": gen.get_state(),
        "mechanism": args.mechanism,
        "mochi": args.mochi,
        "config": json.loads(json.dumps(vars(args), default=str)),  # plain data (safe_load)
        "format": "moco-transfer-moco",
    }


RESUME_KEYS = {"state_dict", "optimizer", "rng", "shuffle_generator", "epoch"}


def load_state(model, state_dict):
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    model.load_state_dict(state_dict)


@restores_logging
def main(args):
    """The run `args` describe, in this process (one of torchrun's or submitit's, or alone);
    the process group and the thread count are this run's only (engine.processes)."""
    args = resolve_args(args)
    with engine.processes(os.environ, args.device, args.threads) as layout:
        return train(args, *layout)


def train(args, rank, world, local_world, device):
    engine.setup_logging(args.output, rank, to_console=not args.quiet)
    precision, amp_dtype, use_scaler, channels_last = engine.resolve_precision(args.precision,
                                                                                device)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) does not divide "
                        f"among {world} processes")
    per_rank_batch = args.batch_size // world
    torch.manual_seed(args.seed + rank)

    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: no such folder (an ImageFolder tree or a flat "
                        "folder of images)")
    dataset, finish = feed.pipeline(args.data, "v2" if args.aug_plus else "v1",
                                    args.image_size, args.seed, args.augment_on, device)
    data_settings = feed.loader_settings(device, args.workers, cpu_count() // local_world)

    model = build_model(args, world, len(dataset)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        model = mechanisms.wrap_ddp(model, [device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    scaler = engine.make_scaler(use_scaler, device)
    gen = torch.Generator().manual_seed(args.seed * 31 + rank)  # key-batch shuffles
    # the mechanism's draws (memory-bank negatives, MoCHi), on the training device: seeded alike
    # on every process, at every iteration (draw_seed)
    draws = torch.Generator(device=device)
    sampler = loader.ResumableSampler(len(dataset), per_rank_batch, args.seed, rank, world)
    bpe = sampler.batches_per_epoch
    total_iters = bpe * args.epochs
    if args.max_iters:
        total_iters = min(total_iters, args.max_iters)

    start_iter = 0
    if args.resume:  # named explicitly: it must load
        resume, ckpt = args.resume, safe_load.load_torch(args.resume, args.trust_checkpoint)
    else:
        resume, ckpt = engine.load_latest_readable(args.output, args.trust_checkpoint)
    if resume:
        missing = RESUME_KEYS - set(ckpt) if isinstance(ckpt, dict) else RESUME_KEYS
        if missing:
            raise UserError(f"{resume}: not a checkpoint of pretrain.main_moco (no "
                            f"{', '.join(sorted(missing))}); give one written by --output")
        if ckpt.get("mechanism", "moco") != args.mechanism:
            raise UserError(f"{resume} was trained with --mechanism "
                            f"{ckpt.get('mechanism', 'moco')}, not {args.mechanism}: use "
                            "another --output, or the same mechanism")
        load_state(model, ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        engine.set_rng_state(ckpt["rng"], device)
        gen.set_state(ckpt["shuffle_generator"])
        start_iter = ckpt.get("iteration", ckpt["epoch"] * bpe)
        logger.info("resumed from %s at iteration %d (epoch %d)", resume, start_iter,
                    start_iter // bpe)

    if rank == 0:
        effective = {**vars(args), **data_settings, "world_size": world,
                     "per_process_batch": per_rank_batch,
                     "precision": precision, "channels_last": channels_last,
                     "device": str(device), "images": len(dataset), "iters_per_epoch": bpe,
                     "total_iters": total_iters, "git_sha": engine.git_sha(),
                     "dictionary": mechanisms.MECHANISMS[args.mechanism].dictionary(
                         args, len(dataset))}
        if args.embedded:
            logger.info("no --data given: running on the EMBEDDED synthetic dataset with a "
                        "small schedule (a demonstration, not the paper's recipe)")
        logger.info("%s (%s) pretraining, resolved settings:\n%s", mechanisms.run_name(args),
                    args.version,
                    "\n".join(f"  {k:>18}: {v}" for k, v in sorted(effective.items())))
        write_json_atomic(effective, os.path.join(args.output, "config.json"), indent=1,
                          default=str)
        logger.info(feed.ceiling_line(feed.measure_rate(dataset), data_settings["num_workers"],
                                      args.augment_on))

    criterion = nn.CrossEntropyLoss()
    progress = engine.Progress(args.output, total_iters, start_iter, rank, args.print_freq,
                               bar="MoCo pretraining" if args.quiet else None)
    it = start_iter
    model.train()
    data = torch.utils.data.DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler,
                                       drop_last=True, **data_settings)
    while it < total_iters:
        epoch, start_batch = divmod(it, bpe)
        lr = engine.adjust_learning_rate(optimizer, args.lr, epoch, args.epochs, args.cos,
                                         args.schedule)
        sampler.set_epoch(epoch, start_batch)  # the epoch travels with each index to the workers
        mechanisms.set_epoch(model, epoch)
        # each sample's index is the image actually read (the memory bank's entry; an
        # unreadable image's place is taken by the next readable one: pretrain/loader.py)
        for views, index in data:
            im_q, im_k = (finish(v) for v in views)  # float32, before the model's autocast
            draws.manual_seed(draw_seed(args.seed, it))
            loss, logits, labels = train_step(model, criterion, optimizer, scaler, im_q, im_k,
                                              device, amp_dtype, channels_last, gen, index,
                                              draws)
            acc1, acc5 = engine.accuracy(logits, labels, topk=(1, 5))
            if progress.logs(it):  # the global batch's loss and accuracy (equal shares)
                loss_all, acc1, acc5 = engine.mean_over_processes([loss.item(), acc1, acc5])
                progress.step(it, epoch, args.batch_size, loss=loss_all, acc1=acc1, acc5=acc5,
                              lr=lr)
            else:
                progress.step(it, epoch, args.batch_size)
            it += 1
            end_of_epoch = it % bpe == 0
            if rank == 0 and (end_of_epoch or it == total_iters or
                              (args.save_every_iters and it % args.save_every_iters == 0)):
                ckpt = checkpoint_dict(args, model, optimizer, scaler, it // bpe, it, bpe, gen,
                                       device)
                engine.save_atomic(ckpt, os.path.join(args.output, "checkpoint_last.pth.tar"))
                if end_of_epoch and ((it // bpe) % args.save_freq == 0 or it == total_iters):
                    engine.save_atomic(ckpt, os.path.join(
                        args.output, f"checkpoint_{it // bpe:04d}.pth.tar"))
            if it >= total_iters:
                break
        if args.knn_data and args.knn_freq and it % bpe == 0 and (it // bpe) % args.knn_freq == 0:
            encoder = (model.module if world > 1 else model).encoder_q
            acc = knn_accuracy(encoder, args.knn_data, device, args.image_size)
            logger.info("kNN monitor (epoch %d): top-1 %.2f%%", it // bpe, acc)
            if progress.tb:
                progress.tb.add_scalar("knn/top1", acc, it)
    progress.close()
    if rank == 0:
        logger.info("done: %d iterations; checkpoint %s", it,
                    os.path.join(args.output, "checkpoint_last.pth.tar"))
    return os.path.join(args.output, "checkpoint_last.pth.tar")


if __name__ == "__main__":
    program(main, get_args_parser())
