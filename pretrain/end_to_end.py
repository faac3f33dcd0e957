"""End-to-end: the keys are encoded by the query encoder itself, from the current batch, with
back-propagation through both (MoCo paper, section 3.2 and Figure 2a; PROTOCOL.md section 7).

The dictionary is the global batch: each query's positive is the key of its own image, the
other images' keys are its negatives (K = batch - 1). Shuffle BN as for MoCo: the keys are
encoded on the batch shuffled across processes (or, on one process, fed in the order that puts
in each SplitBatchNorm group what that process would encode: builder.shuffled_feed), so a query
and its key never share BN statistics; here the shuffled keys carry gradients back to every
process (``gather_with_grad``). The lr follows the linear scaling rule (lr 0.03 per 256 images,
main_moco's default), which the paper says end-to-end needs at large batches.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pretrain.builder import (add_mlp_head, batch_shuffle_ddp, is_distributed, make_encoder,
                              process_layout, shuffled_feed)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's rows."""

    @staticmethod
    def forward(ctx, x):
        rank, world = process_layout()
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_with_grad(x):
    """The global batch's rows (rank-major), differentiable; `x` itself on one process."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


class EndToEnd(nn.Module):
    """
    Args:
        base_encoder: callable(num_classes=..., norm_layer=...) returning a torchvision ResNet
        dim: feature dimension (default 128)
        T: softmax temperature
        mlp: 2-layer MLP head (v2)
        num_splits: BN groups emulating shuffle BN on one process (1 under DDP)
    """

    def __init__(self, base_encoder, dim=128, T=0.07, mlp=False, num_splits=1):
        super().__init__()
        self.T, self.num_splits = T, num_splits
        self.encoder_q = make_encoder(base_encoder, dim, num_splits)
        if mlp:
            add_mlp_head(self.encoder_q)

    def compute_keys(self, im_k, generator=None):
        """Every key of the global batch, with gradients: in the order of the global batch on
        one process, rank-major (all_gather's order) under DDP."""
        if is_distributed():
            shard, idx_unshuffle = batch_shuffle_ddp(im_k, generator)
            k = F.normalize(self.encoder_q(shard), dim=1)
            return gather_with_grad(k)[idx_unshuffle]
        feed = shuffled_feed(im_k.shape[0], self.num_splits, generator).to(im_k.device)
        k = F.normalize(self.encoder_q(im_k[feed]), dim=1)
        return k[torch.argsort(feed)]

    def forward(self, im_q, im_k, generator=None, index=None, draws=None):
        """Returns (logits, labels): logits[i, j] = q_i . k_j / T over the global batch's keys;
        labels[i] is the column of query i's own key."""
        q = F.normalize(self.encoder_q(im_q), dim=1)
        k = self.compute_keys(im_k, generator)
        q, k = q.float(), k.float()
        logits = torch.einsum("nc,mc->nm", q, k) / self.T
        rank, _ = process_layout()
        labels = torch.arange(q.shape[0], device=logits.device) + rank * q.shape[0]
        return logits, labels
