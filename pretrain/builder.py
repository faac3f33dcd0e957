"""MoCo: a query encoder, a momentum key encoder, a queue of keys and the InfoNCE logits.

Shuffle BN comes in two forms:
- under torch.distributed, keys are computed on a batch shuffled across processes and then
  unshuffled, as in the reference code;
- on one process, every BatchNorm computes its statistics on `num_splits` groups of the batch
  (``SplitBatchNorm``: sample n in group n % num_splits), each group standing for one of N
  processes. The groups are exactly the shards N processes would hold: the sampler gives rank r
  the global batch's positions r, r + N, ... (``loader.ResumableSampler``), so the queries'
  groups are the ranks' query batches; the keys are fed in the order that puts in group r what
  rank r would encode after the cross-process shuffle drawn from the same generator, and they
  are enqueued in the order the processes' all_gather would give. One process with
  ``num_splits = N`` therefore computes the N-process step, up to float summation order
  (tests/test_distributed.py compares the losses with torchrun on 2 processes).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed per group of samples: sample n of the
    batch is in group n % `num_splits` (as ``loader.ResumableSampler`` deals the global batch
    to processes), whatever the memory format, without copying the batch:
    - NCHW-contiguous input: the groups fold into the channel axis as a free view
      (N, C, H, W) -> (N / g, g * C, H, W) and one native batch-norm call does all;
    - otherwise (channels_last): each group is a strided view x[k::g] through the native
      kernel, written back into an output of the input's memory format.
    The running statistics are the mean over groups, as averaging per-GPU statistics would be.
    """

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        g = self.num_splits
        if n % g:
            raise ValueError(f"batch {n} is not divisible by shuffle-BN groups {g}")
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if x.is_contiguous():
            mean_split = self.running_mean.repeat(g)
            var_split = self.running_var.repeat(g)
            out = F.batch_norm(x.view(n // g, g * c, h, w), mean_split, var_split,
                               self.weight.repeat(g), self.bias.repeat(g), True, self.momentum,
                               self.eps).view(n, c, h, w)
            means, vars_ = mean_split.view(g, c), var_split.view(g, c)
        else:
            out = torch.empty_like(x)
            means, vars_ = [], []
            for k in range(g):
                rm, rv = self.running_mean.clone(), self.running_var.clone()
                out[k::g] = F.batch_norm(x[k::g], rm, rv, self.weight, self.bias, True,
                                         self.momentum, self.eps)
                means.append(rm)
                vars_.append(rv)
            means, vars_ = torch.stack(means), torch.stack(vars_)
        self.running_mean.copy_(means.mean(0))
        self.running_var.copy_(vars_.mean(0))
        return out


def split_bn_norm_layer(num_splits):
    def norm(num_features):
        return SplitBatchNorm(num_features, num_splits)

    return norm


def make_encoder(base_encoder, dim, num_splits=1):
    """A ResNet with a `dim`-d fc output, its BatchNorm computed on `num_splits` groups of the
    batch (the processes one process stands for)."""
    norm = split_bn_norm_layer(num_splits) if num_splits > 1 else nn.BatchNorm2d
    return base_encoder(num_classes=dim, norm_layer=norm)


def add_mlp_head(encoder):
    """v2: the fc becomes a 2-layer MLP head (hidden-hidden-ReLU-fc)."""
    hidden = encoder.fc.weight.shape[1]
    encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
    return encoder


class MoCo(nn.Module):
    """
    Args:
        base_encoder: callable(num_classes=..., norm_layer=...) returning a torchvision ResNet
        dim: feature dimension (default 128)
        K: queue size, number of negative keys (default 65536)
        m: momentum of the key encoder update (default 0.999)
        T: softmax temperature (default 0.07; 0.2 for v2)
        mlp: replace fc by a 2-layer MLP head (v2)
        num_splits: BN groups emulating shuffle BN on one process (1 under DDP)
    """

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, num_splits=1):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.num_splits = num_splits
        self.encoder_q = make_encoder(base_encoder, dim, num_splits)
        self.encoder_k = make_encoder(base_encoder, dim, num_splits)
        if mlp:  # after both encoders: the reference's order of random draws
            add_mlp_head(self.encoder_q)
            add_mlp_head(self.encoder_k)
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.copy_(p_q.data)
            p_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.mul_(self.m).add_(p_q.data, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        if self.K % batch_size:
            raise ValueError(f"queue size K={self.K} must be a multiple of the batch {batch_size}")
        self.queue[:, ptr:ptr + batch_size] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def compute_keys(self, im_k, generator=None):
        if is_distributed():
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k, generator)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            return batch_unshuffle_ddp(k, idx_unshuffle)
        feed = shuffled_feed(im_k.shape[0], self.num_splits, generator).to(im_k.device)
        k = F.normalize(self.encoder_k(im_k[feed]), dim=1)
        return k[torch.argsort(feed)]

    def extra_negative_logits(self, q, l_neg, draws=None):
        """Negatives beyond the queue, as similarities to `q` (MoCHi adds its mixtures)."""
        return []

    def forward(self, im_q, im_k, generator=None, index=None, draws=None):
        """Returns (logits, labels): logits[:, 0] is the positive, labels are all 0.
        `generator` draws the key shuffle; `index` (dataset indices) is not used by MoCo;
        `draws` is the generator of the random draws of variants (MoCHi)."""
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self.compute_keys(im_k, generator)
        q, k = q.float(), k.float()
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        extra = self.extra_negative_logits(q, l_neg, draws)
        logits = torch.cat([l_pos, l_neg, *extra], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        if not is_distributed():  # in the order N processes' all_gather would enqueue them
            k = k[gathered_order(k.shape[0], self.num_splits).to(k.device)]
        self._dequeue_and_enqueue(k)
        return logits, labels


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor):
    """all_gather without gradient; identity on one process."""
    if not is_distributed():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def gathered_order(batch_size, num_splits):
    """Global positions in the order N = num_splits processes' all_gather would list them
    (rank-major: rank r holds positions r, r + N, ...)."""
    return torch.arange(batch_size).view(batch_size // num_splits, num_splits).t().reshape(-1)


def shuffled_feed(n, num_splits, generator=None):
    """One process standing for N = num_splits: the order to feed a batch of `n` keys in so
    that SplitBatchNorm's group r (positions r, r + N, ...) holds what rank r would encode
    after the cross-process shuffle: the gathered batch's entries idx_shuffle[r * b:(r + 1) * b]
    of the permutation rank 0 would draw (from the same generator) and broadcast."""
    idx_shuffle = torch.randperm(n, generator=generator)
    return gathered_order(n, num_splits)[idx_shuffle.view(num_splits, n // num_splits).t()
                                         .reshape(-1)]


@torch.no_grad()
def batch_shuffle_ddp(x, generator=None):
    """Shuffle the global batch across processes; returns (local shard, undo index)."""
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_gpus = x_gather.shape[0] // batch_size_this
    idx_shuffle = torch.randperm(x_gather.shape[0], generator=generator).to(x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(num_gpus, -1)[dist.get_rank()]
    return x_gather[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x, idx_unshuffle):
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_gpus = x_gather.shape[0] // batch_size_this
    idx_this = idx_unshuffle.view(num_gpus, -1)[dist.get_rank()]
    return x_gather[idx_this]


def process_layout():
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def local_rows(t):
    """This process's rows of a tensor drawn for the global batch: rank r holds global
    positions r, r + N, ... (loader.ResumableSampler); all of them on one process, where the
    batch is the global batch in its own order. Draws made this way on a generator every
    process seeds alike are the same whatever the process count."""
    rank, world = process_layout()
    return t[rank::world] if world > 1 else t
