"""Memory bank (Wu et al. 2018, as the MoCo paper re-implements it: section 3.2, Figure 2b;
PROTOCOL.md section 7).

One `dim`-d entry per dataset image, no key encoder. Each query's positive is its own image's
entry (written at an earlier visit), its K negatives are entries drawn at random from the bank,
and the loss is InfoNCE (the paper's improved version). After the step (``after_step``, called
once the optimizer has stepped, so that the backward pass reads the bank the logits were
computed with, without a copy of it) the batch's entries move towards the queries:
w <- normalise(m w + (1 - m) q), m = 0.5 as in Wu et al.'s code (the MoCo paper gives no
value). The similarities to the bank are computed in float32 (outside autocast: no low-precision
copy of the bank each step). No shuffle BN: there are no keys to shuffle (BN still uses the
per-process groups, so one process with N groups computes what N processes compute). The key
crop the data loader makes is not used.

Choices not printed in the sources (say so where used): the bank starts as unit-norm Gaussian
vectors (Wu et al. start from uniform noise); each query's K negatives are drawn uniformly with
replacement from the other N - 1 entries (its own entry is never its negative; Wu et al. draw
from all N); the draws for the global batch come from one generator every process seeds alike
and each process takes its rows (builder.local_rows), so the negatives do not depend on the
process count. Under DDP every process holds the whole bank and applies the global batch's
update (gathered), so the banks stay identical and are not broadcast.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.builder import (add_mlp_head, concat_all_gather, local_rows, make_encoder,
                              process_layout)

BANK_MOMENTUM = 0.5  # Wu et al.'s code (the MoCo paper gives no value)


class MemoryBank(nn.Module):
    """
    Args:
        base_encoder: callable(num_classes=..., norm_layer=...) returning a torchvision ResNet
        num_images: entries of the bank (the dataset's size)
        dim: feature dimension (default 128)
        K: negatives drawn per query
        T: softmax temperature
        m: momentum of the entries' update (default 0.5)
        mlp: 2-layer MLP head (v2)
        num_splits: BN groups standing for processes on one process (1 under DDP)
        seed: the bank's initial values (the same on every process)
    """

    # the bank is kept identical on every process by construction, not broadcast by DDP
    not_broadcast = ("memory_bank",)

    def __init__(self, base_encoder, num_images, dim=128, K=65536, T=0.07, m=BANK_MOMENTUM,
                 mlp=False, num_splits=1, seed=0):
        super().__init__()
        if num_images < 2:
            raise ValueError(f"a memory bank needs at least 2 images, got {num_images}")
        self.K, self.T, self.m = K, T, m
        self.encoder_q = make_encoder(base_encoder, dim, num_splits)
        if mlp:
            add_mlp_head(self.encoder_q)
        init = torch.randn(num_images, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("memory_bank", F.normalize(init, dim=1))
        self.pending = None  # (queries, indices) of the step whose update is due

    def draw_negatives(self, index, draws=None):
        """(b, K) bank rows: K per query, uniform over the entries other than its own."""
        n = self.memory_bank.shape[0]
        _, world = process_layout()
        offsets = torch.randint(n - 1, (index.shape[0] * world, self.K), generator=draws,
                                device=draws.device if draws is not None else index.device)
        return (index[:, None] + 1 + local_rows(offsets).to(index.device)) % n

    @torch.no_grad()
    def after_step(self):
        """The entries of the last forward's images: w <- normalise(m w + (1 - m) q), for the
        global batch (gathered from every process)."""
        if self.pending is None:
            return
        (q, index), self.pending = self.pending, None
        q, index = concat_all_gather(q), concat_all_gather(index)
        mixed = self.m * self.memory_bank[index] + (1.0 - self.m) * q.to(self.memory_bank.dtype)
        self.memory_bank[index] = F.normalize(mixed, dim=1)

    def forward(self, im_q, im_k=None, generator=None, index=None, draws=None):
        """Returns (logits, labels): logits[:, 0] = q . w_own / T, then the K drawn negatives;
        labels are all 0. `index` holds the batch's dataset indices."""
        if index is None:
            raise ValueError("the memory bank needs each image's dataset index")
        index = index.to(self.memory_bank.device)
        if self.pending is not None:
            raise RuntimeError("memory bank: after_step() was not called after the last step")
        q = F.normalize(self.encoder_q(im_q), dim=1).float()
        bank = self.memory_bank
        negatives = self.draw_negatives(index, draws)
        with torch.autocast(q.device.type, enabled=False):
            l_pos = torch.einsum("nc,nc->n", q, bank[index]).unsqueeze(-1)
            # similarity to every entry, then each query's K: b x N, cheaper than gathering
            # b x K x dim entries whenever N < K * dim (ImageNet: 1.28M < 65536 * 128)
            l_neg = torch.gather(torch.einsum("nc,mc->nm", q, bank), 1, negatives)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self.pending = (q.detach(), index)
        return logits, labels
