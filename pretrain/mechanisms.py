"""The contrastive mechanisms of the MoCo paper, in one registry: what `--mechanism` builds.

All three share the pretext task, encoder, augmentation, InfoNCE loss, data pipeline,
checkpoints (the query encoder as `module.encoder_q.*`, which the converter reads as MoCo),
resume and process layouts; only the dictionary differs (PROTOCOL.md section 7):
- moco: a queue of K keys from a momentum key encoder (section 1); `--mochi N,S,S_PRIME` adds
  MoCHi's hard negative mixing to it (pretrain/mochi.py);
- end_to_end: the keys of the current batch through the query encoder, with gradients;
- memory_bank: one entry per dataset image, K negatives drawn from it per query.
"""
import textwrap
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from pretrain.builder import MoCo
from pretrain.end_to_end import EndToEnd
from pretrain.memory_bank import MemoryBank
from pretrain.mochi import MoCHi, parse_setting


@dataclass(frozen=True)
class Mechanism:
    name: str
    summary: str  # --help
    source: str  # where the recipe is printed
    build: Callable  # (args, base_encoder, num_splits, num_images) -> nn.Module
    dictionary: Callable  # (args, num_images) -> one line for the start-up banner


def _moco(args, arch, splits, num_images):
    common = dict(dim=args.moco_dim, K=args.moco_k, m=args.moco_m, T=args.moco_t, mlp=args.mlp,
                  num_splits=splits)
    if args.mochi:
        return MoCHi(arch, setting=parse_setting(args.mochi, args.moco_k),
                     warmup_epochs=args.mochi_warmup_epochs, **common)
    return MoCo(arch, **common)


def _end_to_end(args, arch, splits, num_images):
    return EndToEnd(arch, dim=args.moco_dim, T=args.moco_t, mlp=args.mlp, num_splits=splits)


def _memory_bank(args, arch, splits, num_images):
    return MemoryBank(arch, num_images, dim=args.moco_dim, K=args.moco_k, T=args.moco_t,
                      m=args.bank_momentum, mlp=args.mlp, num_splits=splits, seed=args.seed)


def _queue_line(args, num_images):
    line = f"queue of K={args.moco_k} keys, key encoder momentum {args.moco_m}"
    if args.mochi:
        n, s, s_prime = parse_setting(args.mochi)
        line += (f"; MoCHi (N={n}, s={s}, s'={s_prime}) from epoch "
                 f"{args.mochi_warmup_epochs}")
    return line


MECHANISMS = {m.name: m for m in (
    Mechanism("moco", "queue + momentum key encoder (the default)",
              "MoCo paper section 3.2; reference code (PROTOCOL.md section 1)", _moco,
              _queue_line),
    Mechanism("end_to_end", "keys of the current batch through the query encoder, with "
              "gradients, shuffle BN; K = the batch; lr by the linear rule",
              "MoCo paper section 3.2, Figure 2a (PROTOCOL.md section 7)", _end_to_end,
              lambda args, n: f"the global batch: {args.batch_size} keys, with gradients"),
    Mechanism("memory_bank", "one entry per dataset image, K negatives drawn per query, "
              "entries updated with momentum (--bank-momentum), no key encoder, no shuffle BN",
              "Wu et al. 2018 as the MoCo paper re-implements it, section 3.2, Figure 2b "
              "(PROTOCOL.md section 7); m = 0.5 from Wu et al.'s code", _memory_bank,
              lambda args, n: f"a bank of {n} entries, K={args.moco_k} drawn per query, "
                              f"bank momentum {args.bank_momentum}"),
)}


def build(args, base_encoder, num_splits, num_images):
    return MECHANISMS[args.mechanism].build(args, base_encoder, num_splits, num_images)


def run_name(args):
    """The run's default name: the mechanism, or MoCHi's setting (mochi_256_512_0)."""
    return parse_setting(args.mochi).name() if args.mochi else args.mechanism


def _call(model, hook, *args):
    """`hook(*args)` of the mechanism inside `model` (DDP-wrapped or not), if it has one."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if hasattr(module, hook):
        getattr(module, hook)(*args)


def set_epoch(model, epoch):
    """Tell a mechanism with an epoch schedule (MoCHi's warm-up) the epoch about to run."""
    _call(model, "set_epoch", epoch)


def after_step(model):
    """The dictionary update a mechanism makes once the optimizer has stepped (the memory
    bank's entries)."""
    _call(model, "after_step")


def wrap_ddp(model, device_ids):
    """DistributedDataParallel, leaving alone the buffers a mechanism keeps identical on every
    process by construction (the memory bank: broadcasting it every step would cost its size)."""
    ignored = list(getattr(model, "not_broadcast", ()))
    if ignored:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, ignored)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def help_text():
    """The mechanisms and MoCHi, with their sources, for --help."""
    lines = ["mechanisms (--mechanism):"]
    lines += [f"  {m.name}: {m.summary}. Source: {m.source}." for m in MECHANISMS.values()]
    lines += [
        "MoCHi (--mochi N,S,S_PRIME, on --mechanism moco --version v2; Kalantidis et al., "
        "NeurIPS 2020, PROTOCOL.md section 7): per query, the N hardest queue negatives give S "
        "pair mixtures normalise(alpha n_i + (1 - alpha) n_j) and S_PRIME query mixtures "
        "normalise(beta q + (1 - beta) n_j), appended as negatives, detached, never enqueued.",
        "  Not printed in the seeds, from public re-implementations: alpha ~ U(0, 1), beta ~ "
        "U(0, 0.5), detached, never enqueued, appended to the logits, warm-up of "
        "--mochi-warmup-epochs (10 in one re-implementation).",
        "  Chosen here, printed nowhere: hardest = largest q . n; i != j drawn uniformly from "
        "the top N, independently per query and point; under DDP every process holds the "
        "whole queue (not sharded), so the top N is the one process's; draws are made for the "
        "global batch on a generator seeded alike on every process.",
        "memory_bank, chosen here: initial entries unit-norm Gaussian; negatives uniform with "
        "replacement over the other N - 1 entries; the key crop is not used.",
    ]
    return "\n".join(textwrap.fill(line, 95, subsequent_indent="    ") for line in lines)
