"""Pieces shared by the pretraining entry points: processes, precision, checkpoints, progress."""
import contextlib
import datetime
import json
import logging
import os
import re
import subprocess
import time

import torch
import torch.distributed as dist

from convert import distributed, safe_load
from convert import logs
from convert.files import atomic_open
from convert.machine import cpu_has_fast_bf16

logger = logging.getLogger("pretrain")


# ---------------------------------------------------------------- processes
@contextlib.contextmanager
def processes(environ, device_name="auto", threads=None):
    """This process's part of the run torchrun/submitit describe in `environ` (WORLD_SIZE,
    RANK, LOCAL_RANK, LOCAL_WORLD_SIZE): yields (rank, world_size, local_world_size, device),
    the device being this process's GPU (cuda:LOCAL_RANK) or the CPU. Several processes join
    the process group in the one place that does it (convert/distributed.py: NCCL on CUDA, gloo
    on a CPU) and leave it at the end. On a CPU the processes of one machine share its cores
    (`threads` intra-op threads in all, default every core: torchrun's own default is one
    thread per process); the caller's thread count is restored at the end."""
    world = int(environ.get("WORLD_SIZE", "1"))
    local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    rank, local_rank = (int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0))) \
        if world > 1 else (0, 0)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    cpu_threads = None if device.type == "cuda" else \
        distributed.threads_per_process(local_world, threads)
    with distributed.intra_op_threads(cpu_threads):
        if world > 1:
            distributed.join(rank, world, local_rank, device.type == "cuda", "env://")
        try:
            yield rank, world, local_world, device
        finally:
            if world > 1:
                dist.destroy_process_group()


def mean_over_processes(values):
    """The mean of each float over every process (all of them must call it); unchanged on
    one process (convert/distributed.py: on the device the group's backend takes)."""
    return distributed.mean_over_processes(values)


def setup_logging(output_dir, rank, to_console=True):
    """The log goes to <output_dir>/log.txt (rank 0) and, unless `to_console` is False (--quiet:
    a progress bar instead, see Progress), to stdout; other ranks log warnings only."""
    logs.setup_logging(os.path.join(output_dir, "log.txt") if rank == 0 and output_dir else None,
                       to_console, logging.INFO if rank == 0 else logging.WARNING)


def git_sha():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here,
                                      stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=here,
                                stderr=subprocess.DEVNULL)
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------- precision
def resolve_precision(precision, device):
    """'auto' -> bf16 on CUDA with bf16 support and on CPUs with fast bf16, else fp16 on CUDA,
    else fp32. Returns (name, autocast dtype or None, needs GradScaler, channels_last).

    fp16 always needs a GradScaler (make_scaler), on a CPU too: torch's CPU float16 autocast and
    GradScaler("cpu") run every precision path without a GPU ('auto' never picks fp16 there)."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    channels_last = dtype is not None  # faster bf16/fp16 convolutions (GPU and oneDNN CPU)
    return precision, dtype, dtype == torch.float16, channels_last


def make_scaler(needs_scaler, device):
    """The GradScaler fp16 needs (resolve_precision's third value), or None."""
    return torch.amp.GradScaler(device.type) if needs_scaler else None


def optimizer_step(loss, optimizer, scaler):
    """Backward and step. With a GradScaler (fp16) the loss is scaled before backward, a step
    whose gradients overflowed is skipped, and the scale adapts (halved on an overflow)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


# ---------------------------------------------------------------- checkpoints
def save_atomic(obj, path):
    """torch.save, written whole or not at all (convert/files.py)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_latest_readable(output_dir, trust=False):
    """(path, checkpoint) of the newest checkpoint of a run folder that loads, or (None, None):
    checkpoint_last.pth.tar first, then the epoch checkpoints checkpoint_XXXX.pth.tar, newest
    first (convert/safe_load.py's ``newest_readable``; `trust`: --trust-checkpoint)."""
    files = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    names = [n for n in ["checkpoint_last.pth.tar"] if n in files] + sorted(
        (f for f in files if re.fullmatch(r"checkpoint_\d+\.pth\.tar", f)), reverse=True)
    return safe_load.newest_readable(
        [os.path.join(output_dir, n) for n in names],
        lambda p: safe_load.load_torch(p, trust), logger, output_dir, "starting from scratch")


def rng_state(device):
    """The global generators' states in a device-independent form (CPU ByteTensors): the CPU's,
    and the training GPU's on a CUDA run (None on a CPU run)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    """Restore rng_state's states on whatever device this run trains on: the CPU generator's
    always; the GPU's where both runs train on CUDA (an older checkpoint's list of every GPU's
    state gives this process's); a GPU state on a CPU run, or none on a GPU run, leaves the
    GPU generator as seeded."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):
        cuda = cuda[device.index or 0] if device.type == "cuda" and len(cuda) > (
            device.index or 0) else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)


# ---------------------------------------------------------------- progress
class Progress:
    """Logs iteration, metrics, lr, img/s and ETA; writes JSON lines and TensorBoard scalars.
    With `bar` (a description) it also shows a tqdm bar with the ETA and the loss on stderr
    (the quiet console, --quiet)."""

    def __init__(self, output_dir, total_iters, start_iter, rank, print_freq=10, bar=None):
        self.total, self.start, self.print_freq = total_iters, start_iter, print_freq
        self.rank = rank
        self.bar = None
        if bar and rank == 0:
            self.bar = logs.progress_bar(total_iters, bar, start_iter)
        self.t0 = self.t_last = time.time()
        self.images = 0
        self.json = None
        self.tb = None
        if rank == 0 and output_dir:
            self.json = open(os.path.join(output_dir, "metrics.json"), "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
            except Exception as e:  # tensorboard missing: log files still work
                logger.warning("TensorBoard disabled: %s", e)

    def logs(self, it):
        """Whether iteration `it` is logged (the same answer on every process)."""
        done = it + 1
        return done % self.print_freq == 0 or done == self.total

    def step(self, it, epoch, batch_images, **metrics):
        self.images += batch_images
        done = it + 1
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if "loss" in metrics:
                self.bar.set_postfix_str(f"loss {metrics['loss']:.3f}", refresh=False)
        if self.rank != 0 or not self.logs(it):
            return
        now = time.time()
        rate = self.images / max(now - self.t_last, 1e-9)
        elapsed = now - self.t0
        eta = elapsed / max(done - self.start, 1) * (self.total - done)
        record = {"iteration": done, "epoch": epoch, "img_per_s": rate,
                  "eta_s": eta, **metrics}
        msg = "  ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                        for k, v in metrics.items())
        logger.info("epoch %d  iter %d/%d  %s  img/s: %.1f  eta: %s", epoch, done, self.total,
                    msg, rate, datetime.timedelta(seconds=int(eta)))
        if self.json:
            self.json.write(json.dumps(record) + "\n")
            self.json.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, done)
            self.tb.add_scalar("train/img_per_s", rate, done)
        self.images, self.t_last = 0, now

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.json:
            self.json.close()
        if self.tb:
            self.tb.close()


def adjust_learning_rate(optimizer, base_lr, epoch, epochs, cos, schedule):
    """Per-epoch lr of the reference code: cosine, or x0.1 at each milestone."""
    import math

    if cos:
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    else:
        lr = base_lr * (0.1 ** sum(epoch >= m for m in schedule))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def accuracy(output, target, topk=(1,)):
    with torch.no_grad():
        maxk = max(topk)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1))
        return [correct[:k].reshape(-1).float().sum().item() * 100.0 / target.shape[0] for k in topk]
