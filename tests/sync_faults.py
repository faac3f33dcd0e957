"""Synchronisation faults injected into every process of a run, for the fault-injection
controls of tests/test_distributed.py: each must move the 1- against 2-process comparison far
beyond its no-fault difference.

Installed like tests/collective_check.py, by its sitecustomize module, when INJECT_FAULT names
one of FAULTS in the environment.

- no_grad_allreduce: DDP never all-reduces gradients (every backward as under ``no_sync()``);
- grad_sum: DDP sums the processes' gradients instead of averaging them (divides by 1, not by
  the process count): a comm hook;
- key_gather: MoCo enqueues this process's keys in place of the global batch's (the gather of
  ``_dequeue_and_enqueue`` dropped; the queue's layout kept);
- e2e_grad_allreduce: end-to-end's gathered keys send back only this process's gradient (the
  all_reduce of ``_GatherWithGrad.backward`` dropped).
"""
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def after_ddp_init(change):
    init = DistributedDataParallel.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        change(self)
    DistributedDataParallel.__init__ = patched


def summed(state, bucket):
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def no_grad_allreduce():
    after_ddp_init(lambda ddp: setattr(ddp, "require_backward_grad_sync", False))


def grad_sum():
    after_ddp_init(lambda ddp: ddp.register_comm_hook(None, summed))


def key_gather():
    from pretrain import builder

    enqueue = builder.MoCo._dequeue_and_enqueue

    def local_keys(self, keys):
        gather = builder.concat_all_gather
        builder.concat_all_gather = lambda t: t.repeat(dist.get_world_size(), 1)
        try:
            enqueue(self, keys)
        finally:
            builder.concat_all_gather = gather
    builder.MoCo._dequeue_and_enqueue = local_keys


def e2e_grad_allreduce():
    from pretrain import end_to_end

    def backward(ctx, grad):
        return grad.contiguous()[ctx.rows]
    end_to_end._GatherWithGrad.backward = staticmethod(backward)


FAULTS = {f.__name__: f for f in (no_grad_allreduce, grad_sum, key_gather, e2e_grad_allreduce)}


def install(name):
    FAULTS[name]()
