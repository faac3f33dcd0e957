"""Run one transfer task as ``python -m transfer.train_net`` does, recording what the model saw.

    python -m transfer.protocol_probe --record probe.json -- --task coco_mask_fpn_2x \
        --weights random SOLVER.IMS_PER_BATCH 1 SOLVER.MAX_ITER 1

Everything after ``--`` goes to ``transfer.train_net`` unchanged. Every process of the run
records what it saw, whether torchrun started it or ``--num-gpus N`` did (rank r > 0 into
``RECORD.rank<r>``): the recorder runs inside each process, around train_net's ``main``. The record (JSON) holds, for
every forward of the detection/segmentation model (any detectron2 meta-architecture): train or
test mode, and per image its file, the size of the image tensor it received and, for semantic
segmentation, the size of the predicted map; for every training iteration the wall and CPU
seconds from the model's forward to the end of the optimizer step; and the peak resident memory
of the process. The
full-protocol test tier (tests/test_full_protocol.py) asserts on it, and ``make bench-tasks``
turns it into the per-task cost table of BENCHMARKS.md.
"""
import argparse
import functools
import os
import resource
import sys
import time

import detectron2.utils.comm as comm
import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from convert.files import write_json_atomic
from transfer import train_net
from detectron2.modeling import META_ARCH_REGISTRY

META_ARCHS = tuple(cls for _, cls in META_ARCH_REGISTRY)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


class Recorder:
    """Global hooks: one entry per meta-architecture forward, one per optimizer step."""

    def __init__(self):
        self.forwards = []
        self.steps = []
        self._step_start = None

    def before_forward(self, module, args):
        if isinstance(module, META_ARCHS) and module.training:
            self._step_start = (time.perf_counter(), time.process_time())

    def after_forward(self, module, args, output):
        if not isinstance(module, META_ARCHS):
            return
        images = []
        for i, x in enumerate(args[0]):
            entry = {"file_name": x.get("file_name", ""), "size": list(x["image"].shape[-2:])}
            if not module.training and isinstance(output, list) and "sem_seg" in output[i]:
                entry["output_size"] = list(output[i]["sem_seg"].shape[-2:])
            images.append(entry)
        self.forwards.append({"mode": "train" if module.training else "test", "images": images,
                              "peak_rss_mb": peak_rss_mb()})

    def after_optimizer_step(self, optimizer, args, kwargs):
        if self._step_start is not None:  # forward + backward + step of one iteration
            wall, cpu = self._step_start
            self.steps.append({"wall_s": time.perf_counter() - wall,
                               "cpu_s": time.process_time() - cpu, "peak_rss_mb": peak_rss_mb()})
            self._step_start = None

    def install(self):
        return [register_module_forward_pre_hook(self.before_forward),
                register_module_forward_hook(self.after_forward),
                register_optimizer_step_post_hook(self.after_optimizer_step)]


def recorded_main(record, argv, args):
    """train_net's ``main(args)`` in this process of the run, recorded into `record` (rank 0)
    or ``record.rank<r>``; `argv`: the run's command line, kept in the record."""
    rank = comm.get_rank()
    path = record if rank == 0 else f"{record}.rank{rank}"
    recorder = Recorder()
    handles = recorder.install()
    started = time.perf_counter()
    error = None
    try:
        return train_net.main(args)
    except BaseException as e:  # recorded, then raised again with its traceback
        error = e
        raise
    finally:
        for h in handles:
            h.remove()
        write_json_atomic({"argv": argv, "forwards": recorder.forwards,
                           "train_steps": recorder.steps,
                           "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - started,
                           "threads": torch.get_num_threads(),
                           "error": None if error is None else f"{type(error).__name__}: {error}"},
                          path, indent=1)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", required=True, help="JSON file to write")
    args = p.parse_args(argv[:split])
    run_argv = argv[split + 1:]
    train_net.execute(train_net.parse_args(run_argv),
                      functools.partial(recorded_main, os.path.abspath(args.record), run_argv))


if __name__ == "__main__":
    main()
