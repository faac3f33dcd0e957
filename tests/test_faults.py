"""Fault injection on CPU: SIGKILL at chosen points of pretraining, transfer and a suite, a
checkpoint truncated on disk, a corrupted image, user errors. Each case asserts the outcome:
results identical to an uninterrupted run after resume, or one clear error line with nothing
half-written.

The transfer cases use the embedded synthetic task (Mask R-CNN R18-FPN) at smoke scale with
64-pixel images, 5 iterations and a checkpoint every 2 (model_0000001, model_0000003,
model_final), on a 16-image generated dataset.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from convert import safe_load
from tests.conftest import ROOT, requires_shared

TASK = "synthetic_mask_fpn_1k"
SMALL = ["SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "2",
         "INPUT.MIN_SIZE_TRAIN", "(56, 64)", "INPUT.MAX_SIZE_TRAIN", "128",
         "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
         "TEST.PRECISE_BN.NUM_ITER", "2"]


# ---------------------------------------------------------------- helpers
def synthetic_root(path, n_train=16, n_val=2):
    from pretrain import synthetic

    synthetic.generate(os.path.join(path, "synthetic"), n_unlabeled=0, n_labeled_per_class=0,
                       n_train=n_train, n_val=n_val, quiet=True)
    return str(path)


def transfer_cmd(runs, *opts, seed=0):
    return [sys.executable, "-m", "transfer.train_net", "--task", TASK, "--scale", "smoke",
            "--seed", str(seed), "--runs", str(runs), *SMALL, *opts]


def run_dir(runs, seed=0):
    return os.path.join(str(runs), f"{TASK}@smoke", "random", f"seed{seed}")


def env_for(datasets_root):
    return dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONUNBUFFERED="1")


def start(cmd, env, log):
    """A process in its own session, so that the whole group (data workers, the runs a suite
    starts) can be killed at once, as a scheduler does."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc, condition, timeout=600):
    """SIGKILL the process group as soon as `condition()` holds."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the process ended before the kill point"
        assert time.time() < deadline, "kill point not reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(cmd, env, log):
    res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=open(log, "a"),
                         stderr=subprocess.STDOUT)
    assert res.returncode == 0, open(log).read()[-3000:]


def logged_iterations(d):
    path = os.path.join(d, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line)["iteration"] for line in f
                if line.endswith("\n") and '"total_loss"' in line]


def log_has(d, text):
    path = os.path.join(d, "log.txt")
    return os.path.isfile(path) and text in open(path).read()


def assert_same_weights(a, b):
    sa = safe_load.load_torch(a)["model"]
    sb = safe_load.load_torch(b)["model"]
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def child_pids(pid):
    children = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.split("/")[2]))
    return children


def metrics(d):
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)["metrics"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_root(tmp_path_factory.mktemp("faults-datasets"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run with 2 data workers."""
    runs = tmp_path_factory.mktemp("reference")
    finish(transfer_cmd(runs), env_for(data), str(runs / "out.log"))
    return run_dir(runs)


# ---------------------------------------------------------------- transfer
def test_batches_are_a_function_of_seed_and_iteration():
    """Resuming at iteration k yields the batches an uninterrupted run yields from k on; the
    processes' shares make up the global batch; each batch is one aspect-ratio bucket."""
    from transfer.sampling import IterationBatches, aspect_groups

    sizes = [(10, 5), (5, 10), (10, 5), (5, 10), (8, 8), (9, 3), (3, 9)]
    groups = aspect_groups([{"width": w, "height": h} for w, h in sizes])
    assert groups.tolist() == [0, 1, 0, 1, 1, 0, 1]
    first = [b for _, b in zip(range(12), IterationBatches(groups, 4, seed=3))]
    assert [b for _, b in zip(range(5), IterationBatches(groups, 4, seed=3, start_iter=7))] \
        == first[7:]
    for batch, r0, r1 in zip(first, IterationBatches(groups, 4, 3, rank=0, world_size=2),
                             IterationBatches(groups, 4, 3, rank=1, world_size=2)):
        assert r0 + r1 == batch and len({groups[i] for i, _ in batch}) == 1
    assert len({seed for b in first for _, seed in b}) == 48  # a seed per sample
    other = [b for _, b in zip(range(12), IterationBatches(groups, 4, seed=4))]
    assert other != first


def test_transfer_killed_between_checkpoints_during_eval_and_truncated_resumes_exactly(
        data, reference, tmp_path):
    env, log = env_for(data), str(tmp_path / "out.log")
    d = run_dir(tmp_path)
    cmd = transfer_cmd(tmp_path, "DATALOADER.NUM_WORKERS", "0")  # the reference used 2

    # 1. SIGKILL after iteration 2, between the checkpoints of iterations 1 and 3
    kill_when(start(cmd, env, log), lambda: 2 in logged_iterations(d))
    assert open(os.path.join(d, "last_checkpoint")).read() == "model_0000001.pth"
    with open(os.path.join(d, "status.json")) as f:
        assert json.load(f)["state"] == "running"
    # a checkpoint write cut by a kill leaves at most a temporary file, never a model_*.pth
    with open(os.path.join(d, ".tmp-cut.pth"), "wb") as f:
        f.write(b"PK\x03\x04 partial")

    # 2. resumed at iteration 2, then SIGKILL again during the final evaluation
    kill_when(start(cmd, env, log), lambda: log_has(d, "Start inference"))
    assert logged_iterations(d) == [0, 1, 2, 3, 4]  # iterations 2.. retrained, once each
    assert not os.path.exists(os.path.join(d, "results.json"))

    # 3. started again: evaluates model_final without training
    finish(cmd, env, log)
    log_text = open(os.path.join(d, "log.txt")).read()
    assert "Starting training from iteration 5" in log_text
    assert logged_iterations(d) == [0, 1, 2, 3, 4]
    assert_same_weights(os.path.join(d, "model_final.pth"),
                        os.path.join(reference, "model_final.pth"))
    assert metrics(d) == metrics(reference)
    assert metrics(d)["bbox/AP"] >= 0

    # 4. model_final truncated on disk: the run falls back to model_0000003 (one line),
    # trains iteration 4 again and ends with the same weights and metrics
    final = os.path.join(d, "model_final.pth")
    size = os.path.getsize(final)
    with open(final, "r+b") as f:
        f.truncate(size // 2)
    finish(cmd, env, log)
    log_text = open(os.path.join(d, "log.txt")).read()
    warned = [line for line in log_text.splitlines() if "unreadable checkpoint" in line]
    assert len(warned) == 1 and "model_final.pth" in warned[0] and \
        "resuming from model_0000003.pth" in warned[0]
    assert "Starting training from iteration 4" in log_text
    assert_same_weights(final, os.path.join(reference, "model_final.pth"))
    assert metrics(d) == metrics(reference)
    assert not glob.glob(os.path.join(d, "*.tmp")) and sorted(
        f for f in os.listdir(d) if f.startswith(".tmp-")) == [".tmp-cut.pth"]


def test_corrupted_image_stops_with_one_line_and_nothing_half_written(tmp_path):
    root = synthetic_root(tmp_path / "datasets", n_train=2, n_val=1)
    images = sorted(glob.glob(os.path.join(root, "synthetic", "coco", "train", "*.jpg")))
    with open(images[1], "r+b") as f:  # a JPEG cut short: its header survives
        f.truncate(200)
    runs = tmp_path / "runs"
    res = subprocess.run(transfer_cmd(runs), cwd=ROOT, env=env_for(root), capture_output=True,
                         text=True)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image") and images[1] in last, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    d = run_dir(runs)
    with open(os.path.join(d, "status.json")) as f:
        status = json.load(f)
    assert status["state"] == "failed" and images[1] in status["reason"]
    assert not [f for f in os.listdir(d) if f.endswith(".pth") or f.startswith(".tmp")
                or f == "results.json"]


# ---------------------------------------------------------------- user errors
def test_unknown_override_names_the_key_and_its_nearest_valid_keys(tmp_path):
    from transfer.config import setup_cfg
    from transfer.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        setup_cfg(TASK, scale="smoke", overrides=["SOLVER.BASE_LRR", "0.1"])
    assert str(e.value) == ("unknown config key 'SOLVER.BASE_LRR' in the overrides; did you "
                            "mean SOLVER.BASE_LR, SOLVER.BIAS_LR_FACTOR, SOLVER.STEPS?")
    res = subprocess.run(transfer_cmd(tmp_path, "MODEL.RPN.NMS_TRESH", "0.5"), cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(
        "error: unknown config key 'MODEL.RPN.NMS_TRESH' in the overrides; did you mean "
        "MODEL.RPN.NMS_THRESH")
    with pytest.raises(ConfigError, match="override SOLVER.MAX_ITER many: expected"):
        setup_cfg(TASK, scale="smoke", overrides=["SOLVER.MAX_ITER", "many"])
    with pytest.raises(ConfigError, match="'SOLVER.BASE_LR' has no value"):
        setup_cfg(TASK, overrides=["SOLVER.BASE_LR"])
    assert not os.listdir(tmp_path)


@requires_shared
def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(tmp_path, monkeypatch):
    """A KeyError that is not the user's (here: a dataset whose evaluator type has no
    evaluator) propagates; the user's own errors become one line."""
    from transfer import evaluators, train_net

    monkeypatch.delitem(evaluators.EVALUATORS, "coco")
    args = ["--task", "coco_mask_fpn_1x", "--scale", "smoke", "--runs", str(tmp_path),
            "--eval-only"]
    with pytest.raises(KeyError, match="no evaluator for dataset 'coco_2017_val'"):
        train_net.cli(args)
    with pytest.raises(SystemExit) as e:
        train_net.cli(args + ["--weights", str(tmp_path / "missing.pkl")])
    assert str(e.value) == f"error: weights file '{tmp_path / 'missing.pkl'}' not found"


# ---------------------------------------------------------------- pretraining
def pretrain_cmd(data, out, **kw):
    opts = dict(data=data, output=str(out), arch="resnet18", epochs=2, batch_size=8,
                moco_k=16, image_size=32, shuffle_groups=2, workers=0, precision="fp32",
                print_freq=1, save_freq=1)
    opts.update(kw)
    return [sys.executable, "-m", "pretrain.main_moco"] + [
        x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-images")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(
            root / f"{i:03d}.jpg")
    return str(root)


def pretrain_iterations(out):
    path = os.path.join(out, "metrics.json")
    if not os.path.isfile(path):
        return []
    return [json.loads(line)["iteration"] for line in open(path) if line.endswith("\n")]


def test_pretraining_killed_mid_epoch_and_with_truncated_checkpoint_resumes_exactly(
        images, tmp_path):
    env, log = dict(os.environ, PYTHONUNBUFFERED="1"), str(tmp_path / "out.log")
    full, cut = tmp_path / "full", tmp_path / "cut"
    finish(pretrain_cmd(images, full), env, log)
    ref = safe_load.load_torch(full / "checkpoint_last.pth.tar")
    assert ref["iteration"] == 6  # 2 epochs of 3 iterations

    # SIGKILL in the middle of epoch 2 (after iteration 4 of 6)
    kill_when(start(pretrain_cmd(images, cut), env, log),
              lambda: 4 in pretrain_iterations(cut))
    # the latest checkpoint is then cut short on disk: the run falls back to the newest
    # readable one, the epoch-1 checkpoint
    last = cut / "checkpoint_last.pth.tar"
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 3)
    finish(pretrain_cmd(images, cut), env, log)
    text = open(cut / "log.txt").read()
    warned = [line for line in text.splitlines() if "unreadable checkpoint" in line]
    assert len(warned) == 1 and "checkpoint_last.pth.tar" in warned[0]
    assert "resuming from checkpoint_0001.pth.tar instead" in warned[0]
    assert "checkpoint_0001.pth.tar at iteration 3 (epoch 1)" in text
    got = safe_load.load_torch(last)
    assert got["iteration"] == 6
    for k, v in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k


# ---------------------------------------------------------------- suites
def test_suite_killed_midway_then_preempted_under_submitit_completes_exactly(
        data, reference, tmp_path, monkeypatch):
    """`make suite` SIGKILLed (with its run) in the middle of a run, started again through
    submitit's local executor, whose job is preempted and requeued: the complete run is
    reused untouched, the killed one resumes twice and ends bit-identical to the reference."""
    from tools.suite import get_parser, plan, submit_slurm

    runs = tmp_path / "runs"
    # a complete run the suite must reuse as it is (a copy of the reference, for seed 1)
    done = run_dir(runs, seed=1)
    shutil.copytree(reference, done)
    stamp = {f: os.path.getmtime(os.path.join(done, f)) for f in os.listdir(done)
             if os.path.isfile(os.path.join(done, f))}
    suite_args = ["--tasks", TASK, "--weights", "random", "--seeds", "2", "--scale", "smoke",
                  "--runs", str(runs)]
    env, log = env_for(data), str(tmp_path / "suite.log")
    d = run_dir(runs, seed=0)

    # 1. the local suite is killed, with the run it started, after iteration 2 of seed 0
    kill_when(start([sys.executable, "-m", "tools.suite", *suite_args, *SMALL], env, log),
              lambda: 2 in logged_iterations(d))
    out = open(log).read()
    assert "1 to start, 0 to resume, 1 complete" in out

    # 2. started again through submitit (local executor); the job is preempted after
    # iteration 3 and requeued: it resumes from its last checkpoint and completes
    monkeypatch.setenv("DETECTRON2_DATASETS", data)
    args = get_parser().parse_args(suite_args + ["--slurm", "--cluster", "local",
                                                 "--gpus-per-node", "1", *SMALL])
    planned = plan(args.tasks.split(), args.weights.split(), [0, 1], args.scale, args.runs)
    assert [(p.seed, p.action) for p in planned] == [(0, "resume"), (1, "skip")]
    job, = submit_slurm(planned, args.runs, args)
    deadline = time.time() + 600
    while 3 not in logged_iterations(d) or logged_iterations(d)[-1] != 3:
        assert job.state not in ("DONE", "FAILED"), job.stderr()
        assert time.time() < deadline
        time.sleep(0.05)
    # SLURM's preemption signal (USR2), to the job's task; submitit's local controller,
    # like SLURM, starts the task again when it exits for a requeue
    task, = child_pids(job._process.pid)
    os.kill(task, signal.SIGUSR2)
    assert job.result() == d
    assert "Requeued job" in (job.stderr() or "") + (job.stdout() or "")

    starts = [line.split("iteration ")[-1] for line in open(os.path.join(d, "log.txt"))
              if "Starting training from iteration" in line]
    assert starts[:2] == ["0\n", "2\n"] and len(starts) == 3  # killed, preempted, finished
    assert logged_iterations(d) == [0, 1, 2, 3, 4]
    assert_same_weights(os.path.join(d, "model_final.pth"),
                        os.path.join(reference, "model_final.pth"))
    assert metrics(d) == metrics(reference)
    assert stamp == {f: os.path.getmtime(os.path.join(done, f)) for f in stamp}
    assert [p.action for p in plan([TASK], ["random"], [0, 1], "smoke", str(runs))] == \
        ["skip", "skip"]
