"""One launch path for every process layout of a transfer run (detectron2's ``launch``, for
CPUs as well as GPUs, and for processes started from outside).

- ``--num-gpus N`` (and ``--num-machines/--machine-rank/--dist-url`` across machines, as in
  detectron2): this machine starts N processes. Where CUDA is present they use NCCL with one GPU
  each; on a CPU they use gloo and share the cores, ``threads // N`` intra-op threads each.
- Started from outside (``torchrun``, or SLURM with one task per GPU, e.g. submitit): each
  process reads its rank from the environment (torchrun's ``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``; SLURM's variables
  through submitit) and starts nothing.

Either way every process joins the same kind of process group and detectron2's ``comm`` gets its
per-machine group, so the training code cannot tell how it was started. Only the entry point
reads the environment (``external_layout``); everything else is handed on as arguments.

Ports: with ``--dist-url auto`` (the default) the parent process binds the rendezvous store on
a port the kernel picks and keeps it bound for the run, so two runs started at once on one
machine never collide (detectron2's "auto" looks for a free port, closes it and hopes).

Failures: if one process dies (killed, out of memory, an exception), the others are stopped
and ``RankFailed`` says in one line which rank it was and how it ended. A process that is alive
but stuck (a deadlock, a rank that never reaches a collective) is not something the parent can
see: the other processes wait in their collective until the process group's timeout
(``timeout``, DEFAULT_TIMEOUT: 30 minutes), then the collective raises and the run ends as
above. Started again, the run resumes from its last checkpoint.

The process group itself is joined in one place for pretraining and transfer
(convert/distributed.py: NCCL on GPUs, gloo on CPUs, the GPU selected first).
"""
import ctypes
import dataclasses
import logging
import signal
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from convert import distributed
from convert.distributed import DEFAULT_TIMEOUT, intra_op_threads, threads_per_process
from transfer.errors import UserError

logger = logging.getLogger(__name__)

# an exit status a worker uses after printing a user error: the parent adds nothing to it
USER_ERROR_EXIT = 3


class RankFailed(UserError, RuntimeError):
    """One process of a multi-process run ended abnormally; the others were stopped."""


@dataclasses.dataclass
class Layout:
    """Where one process sits: global rank, world size, and its machine's share."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    init_method: str = ""  # a URL (tcp://host:port, env://) for init_process_group
    store_port: int = 0  # instead of init_method: the parent's rendezvous store on this host

    @property
    def machine_rank(self):
        return self.rank // self.local_world_size


def external_layout(environ):
    """The layout a launcher outside this program gave this process, or None.

    torchrun (and submitit's exported environment) set RANK/WORLD_SIZE/LOCAL_RANK/
    LOCAL_WORLD_SIZE; a bare SLURM job step with several tasks (``srun``) sets SLURM_* only,
    which submitit parses (first host as the master, a port from the job id)."""
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        world = int(environ["WORLD_SIZE"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
        return Layout(rank=int(environ["RANK"]), world_size=world,
                      local_rank=int(environ.get("LOCAL_RANK", 0)), local_world_size=local_world,
                      init_method="env://")
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit  # only on a cluster

        env = submitit.helpers.TorchDistributedEnvironment()
        return Layout(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                      local_world_size=env.local_world_size,
                      init_method=f"tcp://{env.master_addr}:{env.master_port}")
    return None


def set_local_process_group(group):
    """detectron2 v0.6 keeps the per-machine group in a module attribute that only its own
    ``launch`` sets (later versions have ``comm.create_local_process_group``); this is the one
    place that sets it. tests/test_distributed.py fails if detectron2 stops reading it."""
    comm._LOCAL_PROCESS_GROUP = group


def init_process_group(layout, timeout=DEFAULT_TIMEOUT):
    """Join the run's process group (convert/distributed.py: NCCL with CUDA, gloo on a CPU)
    and give detectron2's ``comm`` its per-machine group. Returns the backend."""
    store = dist.TCPStore("127.0.0.1", layout.store_port, layout.world_size, is_master=False,
                          timeout=timeout) if layout.store_port else None
    backend = distributed.join(layout.rank, layout.world_size, layout.local_rank,
                               torch.cuda.is_available(), init_method=layout.init_method,
                               store=store, timeout=timeout)
    n = layout.local_world_size
    for machine in range(layout.world_size // n):
        group = dist.new_group(list(range(machine * n, (machine + 1) * n)))
        if machine == layout.machine_rank:
            set_local_process_group(group)
    comm.synchronize()
    return backend


def die_with_parent():
    """Linux: this process gets SIGKILL when the process that started it dies, so a killed
    launcher leaves no worker blocked in a collective."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker(local_rank, main_func, args, layout, threads, timeout):
    die_with_parent()
    layout = dataclasses.replace(layout, rank=layout.rank + local_rank, local_rank=local_rank)
    if threads:
        torch.set_num_threads(threads)
    init_process_group(layout, timeout)
    try:
        main_func(*args)
    except UserError as e:  # one line, from the process that found it
        print(f"error: {e}", flush=True, file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    finally:
        dist.destroy_process_group()


def launch_external(main_func, layout, args=(), threads=None, timeout=DEFAULT_TIMEOUT):
    """This process's part of a run whose processes were started from outside (``layout``
    from ``external_layout``); the caller's thread count is restored at the end."""
    cpu_threads = None if torch.cuda.is_available() else \
        threads_per_process(layout.local_world_size, threads)
    with intra_op_threads(cpu_threads):
        init_process_group(layout, timeout)
        try:
            return main_func(*args)
        finally:
            dist.destroy_process_group()


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url="auto",
           args=(), threads=None, timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in every process of the run (see the module docstring).

    ``threads``: on a CPU, the intra-op threads of the whole run on this machine, shared out
    among its processes (default: every core)."""
    world = num_machines * num_gpus_per_machine
    if world == 1:  # in this process, with the caller's thread count restored at the end
        with intra_op_threads(None if torch.cuda.is_available() else threads):
            return main_func(*args)
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise UserError(f"--num-gpus {num_gpus_per_machine}: this machine has "
                        f"{torch.cuda.device_count()} GPU(s)")
    layout = Layout(rank=machine_rank * num_gpus_per_machine, world_size=world,
                    local_world_size=num_gpus_per_machine)
    store = None
    if dist_url == "auto":
        if num_machines > 1:
            raise UserError("--dist-url auto is for one machine; give tcp://HOST:PORT of "
                            "machine 0 to every machine")
        # bound here and held for the whole run: no other run can take the port
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=timeout)
        layout.store_port = store.port
    else:
        layout.init_method = dist_url
    cpu_threads = None if torch.cuda.is_available() else \
        threads_per_process(num_gpus_per_machine, threads)
    logger.info("starting %d processes (%s)", num_gpus_per_machine,
                "NCCL, one GPU each" if cpu_threads is None else
                f"gloo, {cpu_threads} thread(s) each")
    try:
        mp.spawn(_worker, nprocs=num_gpus_per_machine, daemon=False,
                 args=(main_func, args, layout, cpu_threads, timeout))
    except mp.ProcessExitedException as e:
        rank = layout.rank + e.error_index
        if e.exit_code == USER_ERROR_EXIT:
            raise SystemExit(USER_ERROR_EXIT) from None  # the worker printed the one line
        how = f"was killed by {e.signal_name}" if e.signal_name else \
            f"exited with status {e.exit_code}"
        raise RankFailed(f"rank {rank} of {world} (pid {e.error_pid}) {how}; the other processes "
                         "were stopped. Started again, the run resumes from its last "
                         "checkpoint") from None
    except mp.ProcessRaisedException as e:
        # a bug in one process: its traceback, then which rank it was
        raise RuntimeError(f"rank {layout.rank + e.error_index} of {world} failed:\n{e}") \
            from None
    finally:
        del store
