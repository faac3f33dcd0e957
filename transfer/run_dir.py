"""The run-directory contract: where a run lives and the JSON files it leaves there.

    <runs>/<task>[@<scale>]/<weights>/seed<k>/
        config.yaml      the resolved config (detectron2's default_setup)
        status.json      state: running | complete | failed | diverged | interrupted, and why
        results.json     the final evaluation: flat metrics + everything the tables need
                         (paper table, description, metrics wanted, protocol, weights hash)
                         and what the run cost (``cost``: transfer/cost.py)
        metrics.json     detectron2's training log, one JSON line per iteration (every
                         iteration, losses unsmoothed: trainer.metrics_writer)
        log.txt, model_*.pth, last_checkpoint

``results/`` reads these files back (``results/collect.py``) and imports nothing from here.
"""
import json
import os
import time
import traceback

from convert.files import read_json_lines, write_json_atomic

STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.json"


def run_dir(runs_root, task, weights_name, seed, scale="full"):
    """<runs>/<task>[@scale]/<weights>/seed<k>: the weights and seed are run axes."""
    task_dir = task if scale == "full" else f"{task}@{scale}"
    return os.path.join(runs_root, task_dir, weights_name, f"seed{seed}")


def protocol_of(cfg):
    """The settings that must agree for runs to be averaged together. The process count is not
    one of them: the batch is the global batch, and with naiveSyncBN the BN statistics are the
    global batch's, so 1 x 16 and 8 x 2 images are the same protocol (``processes_of``)."""
    return {
        "max_iter": cfg.SOLVER.MAX_ITER, "steps": list(cfg.SOLVER.STEPS),
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "base_lr": cfg.SOLVER.BASE_LR,
        "warmup_iters": cfg.SOLVER.WARMUP_ITERS, "norm": cfg.MODEL.RESNETS.NORM,
        "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN), "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "scale": cfg.MOCO_TRANSFER.SCALE, "deviations": list(cfg.MOCO_TRANSFER.DEVIATIONS),
    }


def processes_of(cfg):
    """How the run was laid out: a record beside the protocol, not part of it."""
    world = cfg.MOCO_TRANSFER.NUM_GPUS
    return {"world_size": world, "ims_per_process": cfg.SOLVER.IMS_PER_BATCH // world,
            "device": cfg.MODEL.DEVICE}


def weights_source(cfg):
    """The published checkpoint the weights were converted from: name, URL, source sha256
    (None for a file of the user's or random init)."""
    t = cfg.MOCO_TRANSFER
    if not t.WEIGHTS_ZOO_NAME:
        return None
    return {"name": t.WEIGHTS_ZOO_NAME, "url": t.WEIGHTS_SOURCE_URL,
            "sha256": t.WEIGHTS_SOURCE_SHA256}


def run_record(cfg, **extra):
    return {"task": cfg.MOCO_TRANSFER.TASK, "weights": cfg.MOCO_TRANSFER.WEIGHTS,
            "weights_file": cfg.MODEL.WEIGHTS, "weights_sha256": cfg.MOCO_TRANSFER.WEIGHTS_SHA256,
            "weights_source": weights_source(cfg),
            "seed": cfg.SEED, "scale": cfg.MOCO_TRANSFER.SCALE, "protocol": protocol_of(cfg),
            "processes": processes_of(cfg),
            "paper_table": cfg.MOCO_TRANSFER.PAPER_TABLE,
            "description": cfg.MOCO_TRANSFER.DESCRIPTION,
            "metrics_wanted": list(cfg.MOCO_TRANSFER.METRICS), **extra}


def flatten_results(results):
    flat = {}
    for group, values in (results or {}).items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{group}/{k}"] = float(v)
    return flat


def _write(record, cfg, name):
    write_json_atomic(record, os.path.join(cfg.OUTPUT_DIR, name), indent=1, default=str)


def write_started(cfg):
    _write(run_record(cfg, state="running", started=time.time()), cfg, STATUS_FILE)


def write_stopped(cfg, error):
    """status.json of a run an exception ended: diverged (NaN loss), interrupted or failed."""
    state = "diverged" if isinstance(error, FloatingPointError) else "failed"
    if isinstance(error, KeyboardInterrupt):
        state = "interrupted"
    _write(run_record(cfg, state=state, reason=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc()), cfg, STATUS_FILE)


def write_stopped_if_running(cfg, error):
    """write_stopped, unless the run's own processes already wrote how it ended (a process
    stopped by the launcher, because another one failed, cannot)."""
    try:
        with open(os.path.join(cfg.OUTPUT_DIR, STATUS_FILE)) as f:
            if json.load(f).get("state") != "running":
                return
    except OSError:  # never started
        return
    except ValueError:  # unreadable: say how it ended
        pass
    write_stopped(cfg, error)


def read_metrics(path):
    """The records of a metrics.json (JSON lines; a line cut by a kill is skipped)."""
    return read_json_lines(path)


def write_results(cfg, results, cost=None):
    """results.json (with `cost`, transfer/cost.py), then status.json complete; returns the
    flat metrics."""
    flat = flatten_results(results)
    record = run_record(cfg, state="complete", finished=time.time(), metrics=flat,
                        results=results, **({"cost": cost} if cost is not None else {}))
    _write(record, cfg, RESULTS_FILE)
    _write(record, cfg, STATUS_FILE)
    return flat


def trim_metrics(path, start_iter):
    """Drop the records of iterations a resumed run trains again (and a line cut by a kill).

    Rewritten in place: detectron2's JSONWriter already holds the file open for appending."""
    if not os.path.isfile(path):
        return
    with open(path, "r+") as f:
        lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("iteration", -1) < start_iter:
                    kept.append(line)
            except ValueError:
                continue
        if kept != lines:
            f.seek(0)
            f.write("".join(k + "\n" for k in kept))
            f.truncate()
