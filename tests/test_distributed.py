"""The protocol's process layout, executed on a CPU: N gloo processes, as NCCL runs them on
N GPUs, against one process with the same global batch.

Transfer runs use the demo task (Faster R-CNN R18-FPN, naiveSyncBN, PreciseBN) at smoke scale
on 64-pixel generated scenes, with a global batch of 4 images: 1 process x 4 or 2 x 2. For the
two to be the same computation up to float summation order, the comparison removes what
legitimately differs with the layout:
- the model's own random draws, which come from each process's generator (as in detectron2):
  every anchor and every proposal goes through the losses (the RPN and ROI batch sizes give
  quotas above the counts: 1023 anchors of a 64-pixel image against 2048 x 0.5, 1023 proposals
  against 4096 x 0.25);
- per-image counts that make a mean of per-process means differ from the global mean: every
  image has the same size (no padding differences) and gives the ROI heads all its 1023
  anchors as proposals (no NMS, no top-k cut, no ground truth appended);
- the top-k cut and NMS are also discrete choices among near-tied scores of an untrained RPN,
  which float noise flips (measured with a top-32 cut: equal to 1e-7 for two iterations, then
  3e-4 apart; without the cut, 6e-7 for three).
What is left to differ is the order of float additions. Even so, thousands of proposals of a
Faster R-CNN meet float noise at IoU 0.5 after a few updates; the comparison over several
updates therefore trains the RPN alone (ProposalNetwork: fixed anchors against fixed boxes, no
label to flip) at the schedule's lr (warmup factor 1, no step), and the Faster R-CNN run on 2
processes is the reference of the kill/resume and evaluation tests. Every 2-process run
has its collectives checked against NCCL (tests/collective_check.py) and each comparison has
fault-injection controls (tests/sync_faults.py) that move it by at least 10x its no-fault
difference.

Tolerances. float32 has a unit roundoff of u = 6e-8; a sum of n terms in another order moves
by a few u times log2(n) for the blocked/pairwise sums of BLAS and oneDNN, and by at most n*u in
the worst case. The largest sums here have n <= 1e4 terms: the losses of the first two
iterations (the forward pass, then after one DDP step) differ by ~1e-7 (measured: 1.1e-7 on
loss_cls).
LOSS_RTOL = 1e-5 sits above that with margin and far below what a real fault gives: the same
run with BN not synchronised across the 2 processes (a control below) differs by percents at
the first iteration. With Faster R-CNN's ROI heads, float noise starts to flip the fg/bg label
of a proposal at IoU 0.5 (on the generated data's VERSION 4: 1.3e-5 on loss_cls at the third
iteration; on VERSION 3, 5e-5 at the fourth and 5e-3 at the sixth), which no tolerance can tell
from a fault: hence the RPN alone for the comparison over several updates (measured 1.6e-7).
BN statistics (PreciseBN's) are compared on the RPN-only runs after 4 iterations (measured
3.3e-6 relative on the variances), and go through E[x^2] - E[x]^2 on several processes
(detectron2's NaiveSyncBatchNorm) against a two-pass variance on one, whose cancellation costs
u * (mean^2 + var) / var: measured <= 3e-5 of a standard deviation on the means and 2.2e-4
relative on the variances. BN_RTOL = 1e-3; statistics of each process's own share, or
fvcore's Bessel correction applied with the local count (the fault precise_bn.py fixes), are
off by 1/n per layer: 0.2% at res2 (n = 512) to 12% at res5 (n = 8).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from convert.machine import cpu_count
from tests import collective_check
from tests.conftest import ROOT
from tests.test_faults import assert_same_weights, env_for, finish, kill_when, log_has, start

TASK = "synthetic_frcnn_fpn_1k"
SAME_COMPUTATION = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "2048", "MODEL.RPN.NMS_THRESH", "1.0",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "2000", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "2000",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "4096", "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1",
    "TEST.PRECISE_BN.NUM_ITER", "2"]
LOSS_RTOL = 1e-5
BN_RTOL = 1e-3


def synthetic_root(path, n_train=16, n_val=12):
    from pretrain import synthetic

    synthetic.generate(os.path.join(path, "synthetic"), n_unlabeled=0, n_labeled_per_class=0,
                       n_train=n_train, n_val=n_val, quiet=True)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_root(tmp_path_factory.mktemp("dist-datasets"))


def record(data, out_dir, num_gpus, *opts, threads=None, fault=None, check=True):
    """A run through tests/dist_worker.py (the launcher, plus a record of the image ids each
    rank loaded and of every iteration's raw losses). Runs of several processes have every
    collective checked (tests/collective_check.py) and, with `fault`, that synchronisation fault
    injected (tests/sync_faults.py)."""
    out = os.path.join(out_dir, "record.json")
    cmd = [sys.executable, "-m", "tests.dist_worker", out, "--num-gpus", str(num_gpus),
           *(["--threads", str(threads)] if threads else []),
           "--task", TASK, "--scale", "smoke", "--output", out_dir, *SAME_COMPUTATION, *opts]
    env = env_for(data)
    if num_gpus > 1 and check:
        env = collective_check.environment(env, out_dir + "-check", fault)
    finish(cmd, env, os.path.join(os.path.dirname(out_dir), "log.txt"))
    with open(out) as f:
        return json.load(f)


def probed(data, out_dir, *argv):
    """A train_net run through transfer/protocol_probe.py: the records of its processes (rank 0's,
    then RECORD.rank1, ...)."""
    record = out_dir + ".probe.json"
    finish([sys.executable, "-m", "transfer.protocol_probe", "--record", record, "--",
            "--task", TASK, "--scale", "smoke", "--output", out_dir, *argv], env_for(data),
           os.path.join(os.path.dirname(out_dir), "log.txt"))
    records = []
    for path in [record] + [f"{record}.rank{r}" for r in range(1, 8)]:
        if os.path.isfile(path):
            with open(path) as f:
                records.append(json.load(f))
    return records


# Several updates at the schedule's lr (warmup factor 1, no step) on a model whose losses make no
# discrete choice that float noise could flip: the RPN alone (ProposalNetwork). Its anchors
# and the ground truth do not move, so each anchor's label is fixed; every anchor goes through
# the losses (module docstring). Measured over 4 iterations: <= 1.6e-7 relative on every loss,
# 3.3e-6 on PreciseBN's variances, 1.1e-6 of a standard deviation on its means.
RPN_ONLY = ["MODEL.META_ARCHITECTURE", "ProposalNetwork", "SOLVER.WARMUP_FACTOR", "1.0",
            "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()"]
RPN_COMPARED_ITERATIONS = 4
LOCAL_BN = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN"]
# the controls: each is the 2-process RPN run with one synchronisation broken; 2 iterations
# (one update) show the gradients' faults, all 4 are run with BN local (the BN statistics'
# control too)
TWO_ITERATIONS = ["SOLVER.MAX_ITER", "2"]
CONTROLS = {"local_bn": dict(opts=LOCAL_BN),
            "no_grad_allreduce": dict(opts=TWO_ITERATIONS, fault="no_grad_allreduce"),
            "grad_sum": dict(opts=TWO_ITERATIONS, fault="grad_sum")}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The RPN-only run on 1 process (with the threads each of 2 processes gets) and on 2,
    the controls, and the Faster R-CNN run on 2 processes (the reference of the kill and
    evaluation tests)."""
    root = tmp_path_factory.mktemp("dist-runs")
    per_process = max(1, cpu_count() // 2)
    out = {
        "one": (record(data, str(root / "one"), 1, *RPN_ONLY, threads=per_process),
                str(root / "one")),
        "two_rpn": (record(data, str(root / "two_rpn"), 2, *RPN_ONLY), str(root / "two_rpn")),
        "two": (probed(data, str(root / "two"), "--num-gpus", "2", *SAME_COMPUTATION),
                str(root / "two")),
    }
    for name, control in CONTROLS.items():
        out[name] = (record(data, str(root / name), 2, *RPN_ONLY, *control["opts"],
                            fault=control.get("fault")),
                     str(root / name))
    return out


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / np.maximum(np.abs(a), 1e-12)


def loss_deviation(one, other, iterations):
    """The largest relative difference of any loss over the first `iterations` iterations."""
    return max(relative(v[:iterations], other["losses"][k][:iterations]).max()
               for k, v in one["losses"].items())


def assert_checked_collectives(run_dir, expected_sites):
    """Every collective of the run's processes was on a tensor a CUDA run holds where its
    group's backend takes it (tests/collective_check.py), and the run made the collectives
    `expected_sites` names (so the check saw them)."""
    seen = collective_check.records(run_dir + "-check")
    violations = sorted({r["where"] for r in seen if r["violation"]})
    assert violations == [], violations
    sites = {r["where"].split(" ")[-1] for r in seen}
    assert set(expected_sites) <= sites, sites


# ---------------------------------------------------------------- the global batch
def test_each_global_batch_is_dealt_out_once_whatever_the_process_count():
    from transfer.sampling import IterationBatches

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 2, size=37)  # two aspect-ratio buckets
    factors = rng.uniform(0.5, 2.5, size=37)  # LVIS-style repeat factors
    for kw in ({}, {"repeat_factors": factors}):
        one = list(zip(range(40), IterationBatches(groups, 8, seed=3, **kw)))
        for world in (2, 4, 8):
            shards = [IterationBatches(groups, 8, seed=3, rank=r, world_size=world, **kw)
                      for r in range(world)]
            for (it, whole), *parts in zip(one, *shards):
                assert all(len(p) == 8 // world for p in parts)
                assert [x for p in parts for x in p] == whole, (world, it)  # (index, seed)


def test_global_batch_that_does_not_divide_is_refused_in_one_line(data, tmp_path):
    res = subprocess.run([sys.executable, "-m", "transfer.train_net", "--task", TASK,
                          "--scale", "smoke", "--num-gpus", "3", "--runs", str(tmp_path),
                          "SOLVER.IMS_PER_BATCH", "4"], cwd=ROOT, env=env_for(data),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: SOLVER.IMS_PER_BATCH 4 (the global batch) does not divide among 3 "
                     "processes; use a process count that divides it"], res.stderr[-2000:]
    assert not os.listdir(tmp_path)  # no process was started, no run directory


def test_smaller_global_batch_follows_the_linear_rule_and_is_recorded_as_a_deviation():
    from results.tables import describe_protocol
    from transfer.config import setup_cfg
    from transfer.run_dir import processes_of, protocol_of

    paper = setup_cfg("coco_mask_fpn_1x", "random", world_size=8)
    assert (paper.SOLVER.IMS_PER_BATCH, paper.SOLVER.BASE_LR) == (16, 0.02)
    one = setup_cfg("coco_mask_fpn_1x", "random", world_size=1)
    assert protocol_of(one) == protocol_of(paper)  # 1 x 16 and 8 x 2: the same protocol
    assert processes_of(one)["ims_per_process"] == 16 and \
        processes_of(paper)["ims_per_process"] == 2

    small = setup_cfg("coco_mask_fpn_1x", "random", world_size=2,
                      overrides=["SOLVER.REFERENCE_WORLD_SIZE", "8"])
    assert small.SOLVER.IMS_PER_BATCH == 4 and small.SOLVER.BASE_LR == pytest.approx(0.005)
    assert small.SOLVER.MAX_ITER == 360000 and tuple(small.SOLVER.STEPS) == (240000, 320000)
    assert small.SOLVER.WARMUP_ITERS == 4000
    protocol = protocol_of(small)
    assert protocol["deviations"] == [
        "global batch 4 instead of 16 (2 per process on 2 instead of 8): linear lr rule, lr "
        "0.02 -> 0.005, 90000 -> 360000 iterations"]
    assert protocol != protocol_of(paper)  # its own row group in the tables
    assert "DEVIATION: global batch 4 instead of 16" in describe_protocol(
        "coco_mask_fpn_1x", json.dumps(protocol))


# ---------------------------------------------------------------- 2 processes = 1 process
def test_two_processes_train_as_one_process_over_several_updates(runs):
    """The RPN-only run: 4 iterations (3 updates at the schedule's lr) on 2 processes equal 1
    process's (measured 1.6e-7 relative at most); each control (BN statistics local,
    gradients not all-reduced, gradients summed instead of averaged) fails the comparison and
    differs by at least 10x the no-fault difference (measured 2.1e-2, 1.4e-4 and 1.5e-3)."""
    one, two = runs["one"][0], runs["two_rpn"][0]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # the launcher gave detectron2's comm its per-machine group (transfer/launch.py's one
    # reach-in into detectron2): local ranks 0 and 1 of a local group of 2
    assert two["local"] == [[0, 2], [1, 2]] and one["local"] == [[0, 1]]
    # every image of each global batch, exactly once across the ranks, in the global order
    assert len(one["image_ids"]) == len(two["image_ids"]) == RPN_COMPARED_ITERATIONS
    for (whole,), (rank0, rank1) in zip(one["image_ids"], two["image_ids"]):
        assert len(rank0) == len(rank1) == 2 and rank0 + rank1 == whole
    assert set(one["losses"]) == {"total_loss", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(len(v) == RPN_COMPARED_ITERATIONS for v in one["losses"].values())
    no_fault = loss_deviation(one, two, RPN_COMPARED_ITERATIONS)
    assert no_fault < LOSS_RTOL
    deviations = {name: loss_deviation(one, runs[name][0], 2) for name in CONTROLS}
    print(f"no fault: {no_fault:.2e}; controls: " +
          ", ".join(f"{k} {v:.2e}" for k, v in deviations.items()))
    for name, deviation in deviations.items():
        assert deviation > LOSS_RTOL and deviation >= 10 * no_fault, (name, deviation)


def test_every_collective_is_where_nccl_takes_it(runs):
    """The 2-process runs of fine-tuning: no collective on a tensor a CUDA run would hold on
    the host (the check fails on the mean of the logged losses as pretrain/engine.py made it
    before it went through convert/distributed.py: test_collective_check_catches_a_host_tensor)."""
    assert_checked_collectives(runs["two_rpn"][1], ["combine_over_processes", "train"])


def test_collective_check_catches_a_host_tensor(tmp_path):
    """The checker's control: 2 gloo processes reduce a logged value as engine.py did before
    the fix (a float64 tensor made on the host: under NCCL, "No backend type associated with
    device type cpu") and as convert/distributed.py does now; only the first is a violation."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(tmp_path / "records")
    mp.spawn(collective_check.control_worker, args=(port, str(tmp_path)), nprocs=2)
    seen = collective_check.records(str(tmp_path))
    assert len(seen) == 4
    assert sorted((r["violation"], r["on_cuda_run"]) for r in seen) == \
        [(False, "device")] * 2 + [(True, "host")] * 2
    assert {r["where"] for r in seen if not r["violation"]} == {
        "convert/distributed.py:69 mean_over_processes"}


def test_bn_statistics_are_those_of_the_global_batch_precise_bn_included(runs):
    """The final weights carry PreciseBN's statistics (2 global batches of 4 images) for every
    BN layer; on 2 processes they equal 1 process's: the mean within BN_RTOL of a standard
    deviation, the variance within BN_RTOL relative. The control, BN local to each process,
    is off by more than BN_RTOL."""
    def weights(name):
        return torch.load(os.path.join(runs[name][1], "model_final.pth"),
                          weights_only=True)["model"]

    def deviation(one, two):
        layers = [k[:-len(".running_var")] for k in one if k.endswith(".running_var")]
        assert len(layers) == 28  # ResNet-18 (20) and FPN (8)
        worst = 0.0
        for layer in layers:
            mean, var = one[layer + ".running_mean"], one[layer + ".running_var"]
            worst = max(worst, float(((two[layer + ".running_mean"] - mean).abs() /
                                      var.sqrt()).max()),
                        float(relative(var, two[layer + ".running_var"]).max()))
        return worst

    one = weights("one")
    assert deviation(one, weights("two_rpn")) < BN_RTOL
    assert deviation(one, weights("local_bn")) > 10 * BN_RTOL


def test_evaluation_on_two_processes_returns_exactly_one_process_metrics(runs, data, tmp_path):
    """Given weights evaluated by 1 process (1 thread) and by 2 processes started by torchrun
    (1 thread each): each validation image is evaluated once, the gathered predictions are
    bit-identical and so are the metrics."""
    weights = os.path.join(runs["two"][1], "model_final.pth")
    def args(name, threads):  # the overrides come last
        return ["--task", TASK, "--scale", "smoke", "--eval-only", "--weights", "random",
                "--threads", str(threads), "--output", str(tmp_path / name),
                "MODEL.WEIGHTS", weights]

    log = str(tmp_path / "log.txt")
    finish([sys.executable, "-m", "transfer.train_net", *args("one", 1)], env_for(data), log)
    finish([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
            "--nproc_per_node", "2", "-m", "transfer.train_net", *args("two", 2)],
           env_for(data), log)
    preds = {}
    for k in ("one", "two"):
        preds[k] = torch.load(os.path.join(tmp_path, k, "inference", "synthetic_val",
                                           "instances_predictions.pth"),
                              weights_only=False)
    ids = sorted(p["image_id"] for p in preds["two"])
    assert len(ids) == 12 and ids == sorted({p["image_id"] for p in preds["one"]})  # each once
    by_id = {k: {p["image_id"]: p["instances"] for p in v} for k, v in preds.items()}
    assert by_id["one"] == by_id["two"]
    results = {}
    for k in ("one", "two"):
        with open(os.path.join(tmp_path, k, "results.json")) as f:
            results[k] = json.load(f)
    assert results["one"]["metrics"] == results["two"]["metrics"]
    assert results["two"]["processes"]["world_size"] == 2


# ---------------------------------------------------------------- kills, resume, who writes
WRITE_AUDIT = '''
import os, sys
_log, _root, _busy = os.environ["WRITE_AUDIT_LOG"], os.environ["WRITE_AUDIT_ROOT"], [False]
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT


def _rank():
    d = sys.modules.get("torch.distributed")
    try:
        return d.get_rank() if d is not None and d.is_initialized() else -1
    except Exception:
        return -1


def _hook(event, args):
    if _busy[0] or event not in ("open", "os.rename"):
        return
    path = args[1] if event == "os.rename" else args[0]
    if not isinstance(path, str) or not os.path.abspath(path).startswith(_root):
        return
    if event == "open" and not (isinstance(args[1], str) and set(args[1]) & set("wax+")) \\
            and not (isinstance(args[2], int) and args[2] & _WRITE):
        return
    _busy[0] = True
    try:
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {_rank()} {event} {os.path.abspath(path)}\\n")
    finally:
        _busy[0] = False


sys.addaudithook(_hook)
'''


def audited_env(data, tmp_path, run_root):
    """The environment of a run whose every process logs each file it opens for writing or
    renames into place under `run_root` (pid, rank, event, path): a sitecustomize module."""
    site = tmp_path / "audit"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(WRITE_AUDIT)
    env = env_for(data)
    env.update(PYTHONPATH=os.pathsep.join([str(site), ROOT]),
               WRITE_AUDIT_LOG=str(tmp_path / "writes.txt"), WRITE_AUDIT_ROOT=str(run_root))
    return env


def writes(tmp_path):
    with open(tmp_path / "writes.txt") as f:
        return [line.split(" ", 3) for line in f.read().splitlines()]


def test_two_process_run_killed_then_a_rank_killed_resumes_bit_identical(runs, data, tmp_path):
    """A 2-process run is SIGKILLed (the whole process group) after its first checkpoint and
    started again; then one of its two processes is SIGKILLed: the job stops within a bounded
    time, with one line that names the rank, and status.json says so; started again, it ends
    with the weights and metrics of the uninterrupted 2-process run, bit for bit. Throughout,
    only rank 0 writes checkpoints, results, status and metrics (rank 1 its own log file), and
    everything is written whole: each checkpoint renamed into place once, no temporary file
    left."""
    reference = runs["two"][1]
    d = str(tmp_path / "run")
    env = audited_env(data, tmp_path, d)
    cmd = [sys.executable, "-m", "transfer.train_net", "--task", TASK, "--scale", "smoke",
           "--num-gpus", "2", "--output", d, *SAME_COMPUTATION]
    log = str(tmp_path / "log.txt")

    # 1. the whole job killed after the checkpoint of the first iteration (model_0000000)
    kill_when(start(cmd, env, log), lambda: os.path.isfile(os.path.join(d, "model_0000000.pth")))
    # 2. started again; rank 1 killed after the next checkpoint (model_0000001)
    proc = start(cmd, env, log)
    kill_when_ready = time.time() + 600
    while not os.path.isfile(os.path.join(d, "model_0000001.pth")):
        assert proc.poll() is None and time.time() < kill_when_ready, open(log).read()[-3000:]
        time.sleep(0.05)
    from tests.test_faults import child_pids
    workers = sorted(child_pids(proc.pid))
    rank1 = [p for p in workers
             if f"{p} 1 " in open(tmp_path / "writes.txt").read()]
    assert len(rank1) == 1, workers
    t0 = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    stopped_in = time.time() - t0
    assert stopped_in < 60
    tail = open(log).read().strip().splitlines()[-1]
    assert tail.startswith(f"error: rank 1 of 2 (pid {rank1[0]}) was killed by SIGKILL; the "
                           "other processes were stopped"), tail
    with open(os.path.join(d, "status.json")) as f:
        status = json.load(f)
    assert status["state"] == "failed" and "rank 1 of 2" in status["reason"]
    # 3. started again: resumes from model_0000001 and finishes
    finish(cmd, env, log)
    assert "Starting training from iteration 2" in open(os.path.join(d, "log.txt")).read()
    assert_same_weights(os.path.join(d, "model_final.pth"),
                        os.path.join(reference, "model_final.pth"))
    with open(os.path.join(d, "results.json")) as f, \
            open(os.path.join(reference, "results.json")) as g:
        assert json.load(f)["metrics"] == json.load(g)["metrics"]

    # who wrote what
    by_rank = {}
    renamed = []
    for pid, rank, event, path in writes(tmp_path):
        name = os.path.relpath(path, d)
        by_rank.setdefault(int(rank), set()).add(name.split(os.sep)[0])
        if event == "os.rename":
            renamed.append(name)
    assert set(by_rank) <= {-1, 0, 1}
    assert by_rank[1] <= {"log.txt.rank1"}, by_rank[1]
    # the launcher (no rank) wrote status.json once, when rank 1 was killed
    assert by_rank.get(-1, set()) <= {"status.json", ".status.json"} | {
        n for n in by_rank.get(-1, set()) if n.startswith(".status.json.")}
    checkpoints = [n for n in renamed if n.startswith("model_")]
    assert sorted(checkpoints) == sorted(set(checkpoints))  # each written once, whole
    assert set(checkpoints) == {"model_0000000.pth", "model_0000001.pth", "model_0000002.pth",
                                "model_final.pth"}
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    assert log_has(d, "World size: 2")


# ---------------------------------------------------------------- pretraining under torchrun
# ResNet-18 at 32 px, global batch 16, K = 64, fp32 (the same arithmetic on every CPU). One
# process with --shuffle-groups 2 computes what 2 processes compute (pretrain/builder.py), so
# their losses differ by float summation order only: measured <= 3e-7 over the first three
# iterations, the one process running as many threads as each of the two does. A change of thread
# count alone moves this tiny, collapsing run by 1e-5 to 1e-3 within a few iterations
# (measured: one process, 1 thread against 2: 1.2e-4 at the third), so the threads match and
# the first three are compared. The controls: one process without shuffle-BN groups (BN over
# all 16) differs at the first; 2 processes whose MoCo enqueues its own keys in place of the
# gathered global batch's (tests/sync_faults.py) at the second, whose logits see them.
PRETRAIN = ["--arch", "resnet18", "--epochs", "1", "--batch-size", "16", "--moco-k", "64",
            "--image-size", "32", "--workers", "0", "--precision", "fp32", "--print-freq", "1",
            "--lr", "0.03"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("pretrain-images")
    rng = np.random.default_rng(0)
    for i in range(112):  # 7 global batches of 16
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(
            root / f"{i:03d}.png")
    return str(root)


def pretrain_cmd(images, out, nproc, *extra):
    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "pretrain.main_moco", "--data", images, "--output", out,
            *PRETRAIN, *extra]


def pretrain_losses(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line)["loss"] for line in f]


def pretrain_run(cmd, out, log, fault=None):
    """A pretraining run; one of several processes has every collective checked
    (tests/collective_check.py) and, with `fault`, that fault injected (tests/sync_faults.py)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "--nproc_per_node" in cmd:
        env = collective_check.environment(env, out + "-check", fault)
    finish(cmd, env, log)
    return pretrain_losses(out)


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-runs")
    log = str(root / "log.txt")
    out = {k: str(root / k) for k in ("one", "two", "no_groups", "key_gather")}
    per_process = str(max(1, cpu_count() // 2))  # the threads each of 2 processes gets
    pretrain_run(pretrain_cmd(images, out["one"], 1, "--shuffle-groups", "2", "--max-iters", "3",
                              "--threads", per_process), out["one"], log)
    pretrain_run(pretrain_cmd(images, out["two"], 2, "--max-iters", "6", "--save-every-iters",
                              "2"), out["two"], log)
    # the controls: BN over the whole batch (no shuffle-BN groups), the keys' gather dropped
    pretrain_run(pretrain_cmd(images, out["no_groups"], 1, "--shuffle-groups", "1",
                              "--max-iters", "1", "--threads", per_process), out["no_groups"], log)
    pretrain_run(pretrain_cmd(images, out["key_gather"], 2, "--max-iters", "2"),
                 out["key_gather"], log, fault="key_gather")
    return out


def test_pretraining_on_two_processes_equals_one_process_with_two_shuffle_groups(pretrained):
    one, two = pretrain_losses(pretrained["one"]), pretrain_losses(pretrained["two"])
    assert len(one) == 3 and len(two) == 6
    no_fault = relative(one, two[:3]).max()
    assert no_fault < LOSS_RTOL
    controls = {"no_groups": relative(one[:1], pretrain_losses(pretrained["no_groups"])).max(),
                "key_gather": relative(one[:2], pretrain_losses(pretrained["key_gather"])).max()}
    print(f"no fault: {no_fault:.2e}; controls: " +
          ", ".join(f"{k} {v:.2e}" for k, v in controls.items()))
    for name, deviation in controls.items():
        assert deviation > LOSS_RTOL and deviation >= 10 * no_fault, (name, deviation)
    with open(os.path.join(pretrained["two"], "config.json")) as f:
        config = json.load(f)
    assert (config["world_size"], config["per_process_batch"]) == (2, 8)
    assert_checked_collectives(pretrained["two"], [
        "mean_over_processes", "concat_all_gather", "batch_shuffle_ddp"])


# The other mechanisms (pretrain/mechanisms.py) on the same layouts: end-to-end's keys carry
# gradients across the processes, the memory bank's draws and updates and MoCHi's mixtures are
# made for the global batch. The one-process run uses the threads each of the 2 processes
# gets (half the machine's cores). Memory bank and MoCHi agree over 3 iterations (measured 2e-6
# and 3e-7). End-to-end, whose 16-image dictionary is back-propagated through both crops,
# amplifies float noise from its second update on: on one process, 1 thread against 2 moves
# its third loss by 8e-5 and its fourth by 2e-3 (PIL augmentation; with the device's, 2
# processes against 1 differ by 1.8e-4 at the third), so it is compared over its first 2
# iterations, the second of which is computed after a whole update through the gathered keys'
# gradients; its control drops the all_reduce of that backward (tests/sync_faults.py).
E2E_COMPARED_ITERATIONS = 2
@pytest.mark.parametrize("mechanism", [["--mechanism", "end_to_end"],
                                       ["--mechanism", "memory_bank"],
                                       ["--mochi", "16,8,4", "--mochi-warmup-epochs", "0"]],
                         ids=["end_to_end", "memory_bank", "mochi"])
def test_pretraining_mechanisms_on_two_processes_equal_one_process(mechanism, images, tmp_path):
    log = str(tmp_path / "log.txt")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    per_process = str(max(1, cpu_count() // 2))
    losses_one = pretrain_run(pretrain_cmd(images, one, 1, "--shuffle-groups", "2", "--threads",
                                           per_process, "--max-iters", "3", *mechanism), one, log)
    losses_two = pretrain_run(pretrain_cmd(images, two, 2, "--max-iters", "3", *mechanism), two,
                              log)
    assert len(losses_one) == len(losses_two) == 3
    end_to_end = "end_to_end" in mechanism
    n = E2E_COMPARED_ITERATIONS if end_to_end else 3
    no_fault = relative(losses_one[:n], losses_two[:n]).max()
    assert no_fault < LOSS_RTOL
    sites = ["mean_over_processes", "concat_all_gather"]
    if end_to_end:
        sites = ["mean_over_processes", "forward", "backward"]  # _GatherWithGrad's
        control = str(tmp_path / "control")
        losses = pretrain_run(pretrain_cmd(images, control, 2, "--max-iters", str(n), *mechanism),
                              control, log, fault="e2e_grad_allreduce")
        deviation = relative(losses_one[:n], losses).max()
        print(f"end_to_end: no fault {no_fault:.2e}; control e2e_grad_allreduce {deviation:.2e}")
        assert deviation > LOSS_RTOL and deviation >= 10 * no_fault
    assert_checked_collectives(two, sites)


def test_pretraining_on_two_processes_killed_resumes_bit_identical_in_the_same_format(
        pretrained, images, tmp_path):
    """torchrun with 2 processes, SIGKILLed (the whole group) after its checkpoint of iteration
    2, started again: its checkpoint after 6 iterations equals the uninterrupted run's bit for
    bit (weights, queue, optimizer), in the reference format of a 1-process checkpoint."""
    from convert.safe_load import load as load_checkpoint

    out = str(tmp_path / "run")
    cmd = pretrain_cmd(images, out, 2, "--max-iters", "6", "--save-every-iters", "2")
    env, log = dict(os.environ, PYTHONUNBUFFERED="1"), str(tmp_path / "log.txt")
    last = os.path.join(out, "checkpoint_last.pth.tar")
    kill_when(start(cmd, env, log), lambda: os.path.isfile(last))
    assert load_checkpoint(last)["iteration"] < 6
    finish(cmd, env, log)
    assert "resumed from" in open(os.path.join(out, "log.txt")).read()
    resumed, reference = load_checkpoint(last), load_checkpoint(
        os.path.join(pretrained["two"], "checkpoint_last.pth.tar"))
    one = load_checkpoint(os.path.join(pretrained["one"], "checkpoint_last.pth.tar"))
    assert resumed["iteration"] == reference["iteration"] == 6
    for k, v in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k
    for a, b in zip(resumed["optimizer"]["state"].values(),
                    reference["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # the format: the same keys as one process writes (module.encoder_q.*, module.queue, ...)
    assert set(resumed) == set(one)
    assert {k: v.shape for k, v in resumed["state_dict"].items()} == \
        {k: v.shape for k, v in one["state_dict"].items()}
    assert any(k.startswith("module.encoder_q.") for k in resumed["state_dict"])


def test_suite_runs_a_two_process_run_under_submitit_one_task_per_gpu(data, tmp_path,
                                                                      monkeypatch):
    """`make suite ... --slurm --gpus-per-node 2` (submitit's local executor standing in for
    SLURM): one job of two tasks, each the run's process of one GPU, started from outside and
    recognised by train_net; the run completes as a 2-process run."""
    from tools.suite import get_parser, plan, submit_slurm

    monkeypatch.setenv("DETECTRON2_DATASETS", data)
    args = get_parser().parse_args(
        ["--tasks", TASK, "--weights", "random", "--seeds", "1", "--scale", "smoke",
         "--runs", str(tmp_path / "runs"), "--slurm", "--cluster", "local",
         "--gpus-per-node", "2", *SAME_COMPUTATION[:4], "SOLVER.MAX_ITER", "2",
         "TEST.PRECISE_BN.NUM_ITER", "1"])
    planned = plan(args.tasks.split(), args.weights.split(), [0], args.scale, args.runs)
    job, = submit_slurm(planned, args.runs, args)
    assert job.results() == [planned[0].run_dir] * 2  # both tasks
    with open(os.path.join(planned[0].run_dir, "results.json")) as f:
        results = json.load(f)
    assert results["state"] == "complete"
    assert results["processes"] == {"world_size": 2, "ims_per_process": 1, "device": "cpu"}


# ---------------------------------------------------------------- hangs, threads, the probe
def test_a_rank_alive_but_stuck_ends_the_run_at_the_process_group_timeout():
    """Rank 1 sleeps (alive: the launcher cannot see it fail) while rank 0 waits in an
    all_reduce: the run ends when the process group's timeout expires (transfer/launch.py's
    docstring), with one line naming the rank; not before the timeout, and not after it by
    more than the start-up and tear-down of 2 processes."""
    from datetime import timedelta

    from tests.dist_worker import stuck_collective
    from transfer.launch import launch

    t0 = time.time()
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed") as failed:
        launch(stuck_collective, 2, args=(600,), threads=2, timeout=timedelta(seconds=15))
    elapsed = time.time() - t0
    assert 15 <= elapsed < 120, elapsed
    assert "timed out" in str(failed.value).lower() or "timeout" in str(failed.value).lower()


def test_runs_inside_another_program_give_back_its_thread_count(images, tmp_path, monkeypatch):
    """main_moco.main and the transfer launcher set a run's intra-op threads (--threads) and
    restore the caller's afterwards (the demo and the tests run them in their own process)."""
    from pretrain import main_moco
    from tests.dist_worker import threads_seen
    from transfer.launch import launch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        monkeypatch.setattr(main_moco, "train", lambda *a: torch.get_num_threads())
        args = main_moco.get_args_parser().parse_args(
            ["--data", images, "--output", str(tmp_path / "run"), "--threads", "1",
             "--device", "cpu"])
        assert main_moco.main(args) == 1
        assert torch.get_num_threads() == 3
        assert launch(threads_seen, 1, threads=2) == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_protocol_probe_records_every_process_of_a_num_gpus_run(runs):
    """`transfer.protocol_probe -- ... --num-gpus 2` (the Faster R-CNN reference run): each
    spawned process records its own forwards and steps (rank 1 into RECORD.rank1): 3 training
    iterations of 2 images each, the 4 images of each global batch between them, then
    PreciseBN's 2 forwards."""
    records = runs["two"][0]
    assert len(records) == 2
    iterations = []
    for r in records:
        train = [fwd["images"] for fwd in r["forwards"] if fwd["mode"] == "train"]
        assert len(train) == 3 + 2 and all(len(images) == 2 for images in train[:3])
        assert len(r["train_steps"]) == 3 and r["error"] is None
        assert any(fwd["mode"] == "test" for fwd in r["forwards"])  # evaluation, split
        iterations.append([[im["file_name"] for im in images] for images in train[:3]])
    for rank0, rank1 in zip(*iterations):
        assert len(set(rank0 + rank1)) == 4
