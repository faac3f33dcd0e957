"""Every collective of a run, checked against what NCCL accepts, on a CPU.

NCCL serves CUDA tensors only: a collective on a CPU tensor raises "No backend type associated
with device type cpu". On a CPU run every tensor is a CPU tensor, so the device alone cannot
tell the tensors a CUDA run would hold on its GPU from those it would leave on the host. This
checker follows that distinction through the run (a TorchFunctionMode, which sees every torch
call of the process):

- a tensor made by a factory without a device (``torch.tensor(values)``, ``torch.zeros(n)``,
  ``torch.from_numpy``, a module's parameters before ``.to(device)``) is on the HOST, and so is
  the result of ``.cpu()``;
- ``.to(device)``/``.cuda()``, and factories given a device, put a tensor on the training
  DEVICE (on a CPU run the code's device is the CPU; on a CUDA run it is the GPU);
- any other op's result is on the host when its tensor inputs are (a host tensor with
  dimensions next to a device tensor would already fail on CUDA).

Each collective of ``torch.distributed`` (all_reduce, all_gather, broadcast, ...) is wrapped:
its group's backend on a CUDA run is the one the code asked for in ``new_group(backend=...)``
or, by default, the one convert/distributed.py joins with on CUDA; a host tensor in a group
whose CUDA backend is NCCL is a VIOLATION. Each process appends one JSON line per collective to
``<COLLECTIVE_CHECK_DIR>/<pid>.jsonl``: op, the group's CUDA backend, the tensor's device, where
a CUDA run would hold it, and the calling line of project code.

Installed into every process of a run (torchrun's, the launcher's spawned workers) through
``site_dir``: a sitecustomize module on PYTHONPATH that installs it when COLLECTIVE_CHECK_DIR is
set in the environment.
"""
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from convert.distributed import backend_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv")
FACTORIES = {getattr(torch, n) for n in (
    "tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange", "randperm",
    "rand", "randn", "randint", "linspace", "eye", "empty_strided")}
MARK = "_collective_check_host"
SITECUSTOMIZE = '''
import os
if os.environ.get("INJECT_FAULT"):
    import tests.sync_faults
    tests.sync_faults.install(os.environ["INJECT_FAULT"])
if os.environ.get("COLLECTIVE_CHECK_DIR"):
    import tests.collective_check
    tests.collective_check.install(os.environ["COLLECTIVE_CHECK_DIR"])
'''


def on_host(t):
    return isinstance(t, torch.Tensor) and getattr(t, MARK, False)


def mark(out, host):
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, MARK, host)
            except (AttributeError, RuntimeError):
                pass


def tensors_in(args):
    """The tensors among `args`, and in its lists and tuples (one level: what torch ops take;
    cheaper than a full tree walk on every op of a training run)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def gives_device(args, kwargs):
    """Whether a factory or .to() call names a device (or a tensor to follow)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (str, torch.device)) for a in args[1:]) if args else False


class Placement(TorchFunctionMode):
    """Marks each tensor with where a CUDA run of the same code would hold it (docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            source = args[0] if func is torch.as_tensor and args else None
            mark(out, not kwargs.get("device") and not (
                isinstance(source, torch.Tensor) and not on_host(source)))
        elif func is torch.Tensor.cpu:
            mark(out, True)
        elif func in (torch.Tensor.to, torch.Tensor.cuda):
            if func is torch.Tensor.cuda or gives_device(args, kwargs):
                mark(out, False)
            elif len(args) > 1 and isinstance(args[1], torch.Tensor):
                mark(out, on_host(args[1]))
            elif isinstance(out, torch.Tensor) and out is not args[0]:
                mark(out, on_host(args[0]))
        elif kwargs.get("device") is not None:
            mark(out, False)
        else:
            inputs = list(tensors_in(args))
            if any(on_host(t) for t in inputs) and not any(
                    not on_host(t) and t.dim() > 0 for t in inputs):
                outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                if not any(t is i for t in outs for i in inputs if not on_host(i)):
                    mark(out, True)
        return out


# detectron2 v0.6's comm.all_gather/gather (evaluation, the run's cost) take their group from
# comm._get_global_gloo_group(): a new gloo group where the default backend is NCCL (a CUDA run),
# the default group elsewhere. On a CUDA run their collectives are therefore gloo's.
D2_GLOO_GATHERS = ("all_gather", "gather")


def in_detectron2_gloo_gather():
    """Whether the collective is made inside detectron2's comm.all_gather/gather, called
    without a group of its own (it then uses _get_global_gloo_group: D2_GLOO_GATHERS)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name in D2_GLOO_GATHERS and code.co_filename.replace(os.sep, "/").endswith(
                "detectron2/utils/comm.py"):
            return frame.f_locals.get("group") is dist.group.WORLD
        frame = frame.f_back
    return False


def caller():
    """The innermost frame of project code (not torch's, not this module's)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(ROOT) and "site-packages" not in path.split(os.sep) and \
                path != os.path.abspath(__file__):
            return f"{os.path.relpath(path, ROOT)}:{frame.lineno} {frame.name}"
    frame = traceback.extract_stack()[-4]
    return f"{frame.filename}:{frame.lineno} {frame.name}"


def install(out_dir):
    """Wrap torch.distributed's collectives and new_group in this process and start following
    tensor placement; records go to out_dir/<pid>.jsonl."""
    c10d = sys.modules["torch.distributed.distributed_c10d"]
    log = os.path.join(out_dir, f"{os.getpid()}.jsonl")
    cuda_backend = {}  # id(group) -> the backend the code asked for

    def wrap_new_group(new_group):
        def wrapped(*args, **kwargs):
            group = new_group(*args, **kwargs)
            if kwargs.get("backend"):
                cuda_backend[id(group)] = str(kwargs["backend"]).lower()
            return group
        return wrapped

    busy = []  # a collective re-enters its wrapper through the mode (handle_torch_function)

    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            if busy:
                return fn(*args, **kwargs)
            busy.append(name)
            try:
                record(name, args, kwargs)
                return fn(*args, **kwargs)
            finally:
                busy.pop()
        return wrapped

    def record(name, args, kwargs):
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        backend = cuda_backend.get(id(group)) if group is not None else None
        backend = backend or ("gloo" if in_detectron2_gloo_gather() else backend_for("cuda"))
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, torch.Tensor):
                continue
            host = on_host(t)
            with open(log, "a") as f:
                f.write(json.dumps({
                    "op": name, "cuda_backend": backend, "device": str(t.device),
                    "on_cuda_run": "host" if host else "device",
                    "violation": host and backend == "nccl", "where": caller()}) + "\n")

    dist.new_group = c10d.new_group = wrap_new_group(c10d.new_group)
    for name in COLLECTIVES:
        original = getattr(c10d, name)
        for module in (dist, c10d):
            setattr(module, name, wrap(name, original))
    Placement().__enter__()  # for the life of the process


def site_dir(path):
    """A folder holding the sitecustomize module that installs the checker (put it first on
    PYTHONPATH, with the repository after it)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    return path


def environment(env, folder, fault=None):
    """`env` for a run whose every process is checked (records in folder/records) and, with
    `fault`, has that fault of tests/sync_faults.py injected."""
    records = os.path.join(folder, "records")
    os.makedirs(records, exist_ok=True)
    env = dict(env, COLLECTIVE_CHECK_DIR=records, PYTHONPATH=os.pathsep.join(
        [site_dir(os.path.join(folder, "site")), ROOT]))
    if fault:
        env["INJECT_FAULT"] = fault
    return env


def records(folder):
    out = []
    directory = os.path.join(folder, "records")
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            out += [json.loads(line) for line in f]
    return out


def control_worker(rank, port, folder):
    """One of 2 gloo processes of the checker's own control (tests/test_distributed.py): the
    mean of a logged loss reduced as pretrain/engine.py reduced it before the fix (a float64
    tensor made on the host) and as it does now (convert/distributed.py)."""
    from convert import distributed

    install(os.path.join(folder, "records"))
    distributed.join(rank, 2, rank, False, init_method=f"tcp://127.0.0.1:{port}")
    try:
        before_the_fix = torch.tensor([float(rank)], dtype=torch.float64)
        dist.all_reduce(before_the_fix)
        assert distributed.mean_over_processes([float(rank)]) == [0.5]
    finally:
        dist.destroy_process_group()
