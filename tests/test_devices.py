"""Pretraining and fine-tuning with evaluation, each resumed after a kill, on the CPU and on CUDA
(the `cuda` variants: `make gpu-check`; `make test` leaves them out). The CPU variants are also
the second environment's subset in `make test` (numpy 2, current Pillow: tools/layer_env.py).

Generated data only (../shared does not travel to a GPU machine): random image folders for
pretraining, the embedded synthetic scenes (pretrain/synthetic.py) for fine-tuning."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from convert import safe_load
from pretrain import main_moco
from tests.conftest import ROOT

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def image_folder(root, count=16, size=40):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
            os.path.join(root, f"{i:03d}.png"))
    return str(root)


def pretrain(device, data, out, max_iters, **extra):
    argv = ["--data", data, "--output", str(out), "--arch", "resnet18", "--batch-size", "8",
            "--moco-k", "16", "--image-size", "32", "--shuffle-groups", "2", "--workers", "0",
            "--epochs", "3", "--max-iters", str(max_iters), "--print-freq", "1",
            "--device", device]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return main_moco.main(main_moco.get_args_parser().parse_args(argv))


def metrics(run_dir, name="metrics.json"):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("device", DEVICES)
def test_pretraining_resumes_after_a_kill_and_a_cpu_reads_its_checkpoint(tmp_path, device):
    data = image_folder(tmp_path / "images")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pretrain(device, data, tmp_path / "run", 4, save_every_iters=1)
    if device == "cuda":
        assert torch.cuda.max_memory_allocated() > 0  # it trained on the GPU
    final = pretrain(device, data, tmp_path / "run", 6)  # again: iterations 5 and 6 only
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("resumed from") == 1 and "at iteration 4" in log
    rows = metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    ck = safe_load.load_torch(final)
    assert ck["iteration"] == 6
    tensors = [v for v in ck["state_dict"].values() if torch.is_tensor(v)]
    assert tensors and all(v.device.type == "cpu" for v in tensors)
    assert all(torch.isfinite(v).all() for v in tensors if v.dtype.is_floating_point)
    # and the converter takes it: detectron2's names, numpy arrays equal to encoder_q's weights
    from convert.to_detectron2 import convert

    out, info = convert(final)
    model = out["model"]
    assert info["arch"] == "resnet18" and "res5.1.conv2.weight" in model
    assert isinstance(model["stem.conv1.weight"], np.ndarray)
    np.testing.assert_array_equal(model["stem.conv1.weight"],
                                  ck["state_dict"]["module.encoder_q.conv1.weight"].numpy())


def train_net(runs, data_root, *opts):
    cmd = [sys.executable, "-m", "transfer.train_net", "--task", "synthetic_frcnn_fpn_1k",
           "--scale", "smoke", "--runs", str(runs), "SOLVER.MAX_ITER", "4",
           "SOLVER.CHECKPOINT_PERIOD", "1", "INPUT.MIN_SIZE_TRAIN", "(96,)",
           "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96", *opts]
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return os.path.join(str(runs), "synthetic_frcnn_fpn_1k@smoke", "random", "seed0")


@pytest.mark.parametrize("device", DEVICES)
def test_fine_tuning_evaluates_and_resumes_after_a_kill(tmp_path, device):
    from pretrain import synthetic

    synthetic.generate(str(tmp_path / "data" / "synthetic"), n_unlabeled=0,
                       n_labeled_per_class=0, n_train=8, n_val=6, quiet=True)
    out = train_net(tmp_path / "runs", tmp_path / "data")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["state"] == "complete" and {"bbox/AP", "bbox/AP50"} <= set(res["metrics"])
    assert f"DEVICE: {device}" in open(os.path.join(out, "config.yaml")).read()
    assert [r["iteration"] for r in metrics(out) if "total_loss" in r] == [0, 1, 2, 3]
    # killed after iteration 2: only the mid-run checkpoint survives
    os.remove(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    os.remove(os.path.join(out, "metrics.json"))
    train_net(tmp_path / "runs", tmp_path / "data")
    assert [r["iteration"] for r in metrics(out) if "total_loss" in r] == [2, 3]
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["state"] == "complete"
    weights = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                         weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.dtype.is_floating_point)
