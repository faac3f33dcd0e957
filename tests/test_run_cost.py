"""Issue #41 on the run side: metrics.json keeps every iteration's losses unsmoothed whatever
the console's period, and results.json's ``cost`` (wall time, device-hours, s/iter, peak memory
of every process, gathered on 2 gloo processes as NCCL would)."""
import json
import os
import socket
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import TrainerBase, hooks
from detectron2.utils.events import JSONWriter

from transfer import cost
from transfer.config import setup_cfg
from transfer.run_dir import read_metrics
from transfer.trainer import metrics_writer

LOSSES = [3.0, 1.0, 2.5, 0.5] * 12  # 48 iterations: more than the console's period of 20


class Scripted(TrainerBase):
    """A trainer whose step logs a known loss: what the writers are given is known."""

    def run_step(self):
        self.storage.put_scalars(total_loss=LOSSES[self.iter], loss_cls=LOSSES[self.iter] / 2)


def train(writer_hook):
    trainer = Scripted()
    trainer.register_hooks([hooks.IterationTimer(), writer_hook])
    trainer.train(0, len(LOSSES))


def test_metrics_json_keeps_every_iteration_unsmoothed(tmp_path):
    train(metrics_writer(str(tmp_path)))
    records = read_metrics(str(tmp_path / "metrics.json"))
    assert [r["iteration"] for r in records] == list(range(len(LOSSES)))
    assert [r["total_loss"] for r in records] == LOSSES  # each as computed, no median
    assert [r["loss_cls"] for r in records] == [v / 2 for v in LOSSES]
    # the iteration timer's seconds are there from the third iteration on (its warm-up)
    assert [r["iteration"] for r in records if "time" in r] == list(range(2, len(LOSSES)))
    # control: detectron2's default writer (period 20, median over 20) thins and smooths
    control = tmp_path / "control"
    control.mkdir()
    train(hooks.PeriodicWriter([JSONWriter(str(control / "metrics.json"))], period=20))
    thinned = read_metrics(str(control / "metrics.json"))
    assert [r["iteration"] for r in thinned] == [19, 39, 47]
    assert thinned[0]["total_loss"] == statistics.median(LOSSES[:20]) != LOSSES[19]


def test_cost_record_from_the_runs_own_records(tmp_path):
    cfg = setup_cfg("synthetic_frcnn_fpn_1k", "random", scale="smoke",
                    output=str(tmp_path / "run"), world_size=2)
    records = [{"iteration": i, "total_loss": 1.0, **({"time": 0.1 * i} if i >= 2 else {})}
               for i in range(10)] + [{"iteration": 9, "bbox/AP": 3.0}]
    rec = cost.cost_record(cfg, 100.0, [1000.0, 1100.0], records, start_iter=6)
    timed = [0.1 * i for i in range(2, 10)]
    assert rec["s_per_iter"] == pytest.approx(statistics.median(timed))
    assert rec["iterations_timed"] == 8
    # the resumed session's wall plus the earlier session's logged iterations (2..5)
    assert rec["wall_s"] == pytest.approx(100.0 + 0.1 * (2 + 3 + 4 + 5))
    assert rec["processes"] == 2 and rec["device_hours"] == pytest.approx(
        2 * rec["wall_s"] / 3600)
    assert rec["peak_memory_mb"] == [1000.0, 1100.0] and rec["device"].startswith("CPU: ")
    assert rec["scale"] == "smoke"
    assert rec["full_protocol"] == {"max_iter": 1000, "ims_per_batch": 4}  # the task's YAML
    json.dumps(rec)  # results.json holds it as it is


def _gather_worker(rank, port, extra_mb, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    held = torch.ones(extra_mb[rank] * 2 ** 18)  # float32: extra_mb MiB, touched
    result = cost.gather_peak_memory("cpu")
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    del held


def test_peak_memory_is_gathered_from_every_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gathered.json")
    # spawned, not forked: a fork of a process whose OpenMP threads already ran (the rest of the
    # suite) can deadlock in the child
    mp.start_processes(_gather_worker, args=(port, [0, 400], out), nprocs=2,
                       start_method="spawn")
    gathered = json.load(open(out))
    assert len(gathered) == 2  # one number per process, in rank order
    assert gathered[1] - gathered[0] > 300  # rank 1 held 400 MiB more
