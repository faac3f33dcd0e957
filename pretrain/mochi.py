"""MoCHi: hard negative mixing on top of MoCo v2 (Kalantidis et al., "Hard Negative Mixing for
Contrastive Learning", NeurIPS 2020; PROTOCOL.md section 7).

For each query q: order the queue's negatives by similarity to q and keep the N hardest; mix
s synthetic negatives from pairs of them, h = normalise(alpha n_i + (1 - alpha) n_j), and s'
harder ones that mix in the query, h' = normalise(beta q + (1 - beta) n_j). Notation
MoCHi (N, s, s').

Printed in the seeds: the above. Not printed, taken from public re-implementations: alpha
~ U(0, 1), beta ~ U(0, 0.5) (the query weighs less than half); the synthetic points are
detached, appended to the logits as extra negatives and never enqueued; mixing starts after a
warm-up (10 epochs in one re-implementation: the default of --mochi-warmup-epochs).
Chosen here, printed nowhere: "hardest" is the largest q . n (both unit vectors; the same
similarities the logits use, before the temperature); the pair (i, j) is two distinct
members of the top N drawn uniformly (j uniform over the other N - 1), n_j of a query mixture
uniform over the top N, every draw independent per query and per point (alpha, beta ~ U[0, 1)
and 0.5 U[0, 1) as torch.rand draws).
Processes: the queue is not sharded (every process holds all K keys, gathered before
enqueueing), so each query's N hardest are computed from the whole queue, as on one process.
The random draws are made for the global batch on a generator every process seeds alike, each
process keeping its rows (builder.local_rows): the mixtures do not depend on the process count.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pretrain.builder import MoCo, local_rows, process_layout

QUERY_WEIGHT_MAX = 0.5  # beta ~ U(0, 0.5): the query weighs less than half
DEFAULT_WARMUP_EPOCHS = 10  # one public re-implementation


class MochiSetting(NamedTuple):
    n_hard: int
    s: int
    s_prime: int

    def name(self):
        return f"mochi_{self.n_hard}_{self.s}_{self.s_prime}"


def parse_setting(text, queue_size=None):
    """'N,S,S_PRIME' -> MochiSetting; a one-line error for anything else."""
    try:
        n, s, s_prime = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--mochi {text!r}: expected three integers N,S,S_PRIME "
                         "(e.g. 256,512,0)") from None
    if min(n, s, s_prime) < 0 or (n < 2 and s) or (n < 1 and s_prime):
        raise ValueError(f"--mochi {text!r}: N must be >= 2 for pair mixtures (>= 1 for query "
                         "mixtures), S and S_PRIME >= 0")
    if queue_size is not None and n > queue_size:
        raise ValueError(f"--mochi {text!r}: N={n} hardest negatives out of a queue of "
                         f"K={queue_size}; lower N or raise --moco-k")
    return MochiSetting(n, s, s_prime)


class Mixtures(NamedTuple):
    """Synthetic negatives of each query and what they were mixed from.
    points: (b, s + s', dim), unit norm, no gradient;
    first, second: (b, s + s') queue columns (first = -1 where the query itself is mixed in);
    weight: (b, s + s') the weight of `first` (alpha), or of the query (beta)."""
    points: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    weight: torch.Tensor


@torch.no_grad()
def hard_negative_mixtures(q, queue, l_neg, setting, draws=None):
    """MoCHi's synthetic negatives for queries `q` (b, dim) from `queue` (dim, K), given the
    similarities `l_neg` = q . queue (b, K)."""
    n_hard, s, s_prime = setting
    q = q.detach()
    b = q.shape[0]
    _, world = process_layout()
    glob = b * world
    dev = draws.device if draws is not None else q.device

    def draw(fn, *args):  # drawn for the global batch, this process's rows kept
        return local_rows(fn(*args, generator=draws, device=dev)).to(q.device)

    hardest = l_neg.detach().topk(n_hard, dim=1).indices  # (b, N) queue columns
    keys = queue.t()
    i = draw(torch.randint, n_hard, (glob, s))
    j = (i + 1 + draw(torch.randint, max(n_hard - 1, 1), (glob, s))) % n_hard
    alpha = draw(torch.rand, (glob, s))
    jq = draw(torch.randint, n_hard, (glob, s_prime))
    beta = QUERY_WEIGHT_MAX * draw(torch.rand, (glob, s_prime))
    first, second, third = hardest.gather(1, i), hardest.gather(1, j), hardest.gather(1, jq)
    pairs = alpha[..., None] * keys[first] + (1 - alpha[..., None]) * keys[second]
    with_query = beta[..., None] * q[:, None, :] + (1 - beta[..., None]) * keys[third]
    points = F.normalize(torch.cat([pairs, with_query], dim=1), dim=2)
    return Mixtures(points, torch.cat([first, torch.full_like(third, -1)], dim=1),
                    torch.cat([second, third], dim=1), torch.cat([alpha, beta], dim=1))


class MoCHi(MoCo):
    """MoCo (v2) whose logits gain s + s' synthetic hard negatives per query once the epoch
    reaches `warmup_epochs` (``set_epoch``). With s = s' = 0 the step is MoCo's, bit for bit."""

    def __init__(self, *args, setting, warmup_epochs=DEFAULT_WARMUP_EPOCHS, **kw):
        super().__init__(*args, **kw)
        self.setting, self.warmup_epochs = setting, warmup_epochs
        if setting.n_hard > self.K:
            raise ValueError(f"MoCHi N={setting.n_hard} exceeds the queue size K={self.K}")
        self.mixing = warmup_epochs <= 0

    def set_epoch(self, epoch):
        self.mixing = epoch >= self.warmup_epochs

    def extra_negative_logits(self, q, l_neg, draws=None):
        if not self.mixing or self.setting.s + self.setting.s_prime == 0:
            return []
        mix = hard_negative_mixtures(q, self.queue, l_neg, self.setting, draws)
        return [torch.einsum("nc,nsc->ns", q, mix.points)]
