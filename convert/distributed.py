"""The one place a process of a multi-process run joins its process group, and the rule for
where a collective's tensors go; pretraining (pretrain/engine.py) and transfer
(transfer/launch.py) both join through ``join``.

- Backend: NCCL with one GPU per process where the run trains on CUDA, gloo on a CPU.
- Device: NCCL serves CUDA tensors only ("No backend type associated with device type cpu"), gloo
  CPU tensors (and CUDA ones, through a copy). ``collective_device`` says, from the group's
  backend, where a collective's tensors must be: every collective of this project either runs on
  tensors of the training device (model outputs, parameters, BN buffers) or puts them there
  through ``collective_device`` (``mean_over_processes``). tests/collective_check.py wraps the
  collectives of whole 2-process runs and fails on any tensor a CUDA run would leave on the CPU.
- ``torch.cuda.set_device(local_rank)`` comes before the group is joined, so NCCL's
  communicators, barriers and every CUDA allocation without an index land on this process's GPU.
- Timeout: a process alive but stuck (or one that never reaches a collective) leaves the others
  waiting in theirs until ``timeout`` (DEFAULT_TIMEOUT); then the collective raises in each
  waiting process and the run ends with an error (gloo; NCCL with its asynchronous error
  handling, torch's default). A dead process is noticed at once by the launcher
  (transfer/launch.py) and by torchrun.
- Threads: on a CPU the processes of one machine share its cores (``threads_per_process``);
  ``intra_op_threads`` sets a run's share and gives the caller its own back.
"""
import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist

from convert.machine import cpu_count

DEFAULT_TIMEOUT = timedelta(minutes=30)


def backend_for(device_type):
    """The process group's backend for a run that trains on `device_type` ('cuda' or 'cpu')."""
    return "nccl" if device_type == "cuda" else "gloo"


def join(rank, world_size, local_rank, cuda, init_method=None, store=None,
         timeout=DEFAULT_TIMEOUT):
    """Join the run's default process group (rendezvous through `store`, a TCPStore, or
    `init_method`, a URL such as env:// or tcp://host:port). Returns the backend."""
    if cuda:
        torch.cuda.set_device(local_rank)  # before NCCL's communicators and any CUDA work
    backend = backend_for("cuda" if cuda else "cpu")
    rendezvous = dict(store=store) if store is not None else dict(init_method=init_method)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                            **rendezvous)
    return backend


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device(group=None):
    """Where `group`'s backend takes a collective's tensors: this process's GPU under NCCL, the
    CPU under gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_processes(values):
    """The mean of each float over every process (all of them must call it), reduced on the
    device the group's backend takes; unchanged on one process."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def threads_per_process(num_processes, threads=None):
    """Intra-op threads of each of `num_processes` CPU processes sharing `threads` (default:
    every core this process may use)."""
    return max(1, (threads or cpu_count()) // num_processes)


@contextlib.contextmanager
def intra_op_threads(threads):
    """torch's intra-op thread count set to `threads` (None or 0: left as it is) while the
    block runs, and the caller's count restored after it: a run inside another program (the
    demo, a test) leaves that program's setting as it found it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
