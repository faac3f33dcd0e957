"""What a run cost, recorded in its results.json as ``cost`` (issue #41):

- ``wall_s``: wall-clock seconds of the session that finished the run (training, evaluation,
  start-up), plus, where it resumed, the logged training time of the earlier sessions
  (metrics.json's per-iteration ``time``; their start-up and lost work are not counted);
- ``device_hours``: processes x wall hours, with ``device`` (the GPU's name, or the CPU's) and
  ``processes``;
- ``s_per_iter``: the median over the logged training iterations of detectron2's per-iteration
  ``time`` (data, forward, backward, step; the first two of each session are its warm-up and
  are not timed), and how many were timed;
- ``peak_memory_mb``: one number per process, gathered from every process (all_gather_object:
  gloo and NCCL alike): on a GPU torch's peak allocated memory, on a CPU the peak resident
  memory of the process;
- ``full_protocol``: the task's protocol iterations and global batch, so that a projection can
  say what a full-size run would take; ``scale``: whether these numbers are of one.
"""
import resource
import statistics

import detectron2.utils.comm as comm
import torch

from convert.machine import cpu_name
from transfer.config import load_task_config


def device_kind(device):
    """The hardware a device string runs on, in words."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU: {cpu_name()}"


def memory_kind(device):
    return ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
            else "peak resident set size")


def peak_memory_mb(device):
    """This process' peak memory on `device`, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20
    return host_peak_rss_mb()


def host_peak_rss_mb():
    """This process' resident-set high-water mark, in MiB: VmHWM of /proc/self/status, which is
    this process image's own. (ru_maxrss also counts what the process held before its exec: a
    worker spawned by a 1 GB parent would report at least 1 GB.) ru_maxrss where there is no
    /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gather_peak_memory(device):
    """Every process' peak memory, in rank order. Every process must call it."""
    return [round(float(m), 1) for m in comm.all_gather(peak_memory_mb(device))]


def iteration_times(records):
    """[(iteration, seconds)] of the training iterations detectron2 timed (metrics.json)."""
    return [(r["iteration"], float(r["time"])) for r in records
            if "time" in r and "iteration" in r]


def cost_record(cfg, session_wall_s, peak_memory, records, start_iter=0):
    """The ``cost`` entry of results.json; `records` are the run's metrics.json records,
    `start_iter` the iteration this session started from (0: not resumed)."""
    times = iteration_times(records)
    earlier = sum(s for it, s in times if it < start_iter)
    wall = session_wall_s + earlier
    processes = cfg.MOCO_TRANSFER.NUM_GPUS
    full = load_task_config(cfg.MOCO_TRANSFER.TASK)
    return {
        "wall_s": round(wall, 3), "device": device_kind(cfg.MODEL.DEVICE),
        "processes": processes, "device_hours": processes * wall / 3600,
        "s_per_iter": statistics.median(s for _, s in times) if times else None,
        "iterations_timed": len(times), "resumed_at_iter": start_iter,
        "peak_memory_mb": list(peak_memory), "memory": memory_kind(cfg.MODEL.DEVICE),
        "scale": cfg.MOCO_TRANSFER.SCALE,
        "full_protocol": {"max_iter": full.SOLVER.MAX_ITER,
                          "ims_per_batch": full.SOLVER.IMS_PER_BATCH},
    }
