"""Every precision path runs on a CPU (torch's CPU float16 autocast, GradScaler("cpu")); fp16
always trains with loss scaling: in MoCo pretraining, linear classification and the supervised
baseline, an overflow injected at one step makes the scaler skip it and halve its scale, and
training goes on with finite losses and weights."""
import json
import math
import os

import pytest
import torch
import torchvision

from convert import safe_load
from pretrain import engine, main_lincls, main_moco, main_supervised

# Small enough that these tiny runs never overflow on their own: with 2-image BN groups, MoCo's
# fp16 gradients reach ~1e3 unscaled (x4: ~3.4e3, far below fp16's largest, 65504)
INIT_SCALE = 4.0
OVERFLOW_AT = 2  # the step whose scaled loss is made infinite


@pytest.mark.parametrize("precision,dtype,scaler", [
    ("fp32", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)])
def test_every_precision_resolves_on_a_cpu(precision, dtype, scaler):
    name, amp_dtype, needs_scaler, channels_last = engine.resolve_precision(
        precision, torch.device("cpu"))
    assert (name, amp_dtype, needs_scaler, channels_last) == (precision, dtype, scaler,
                                                              dtype is not None)
    made = engine.make_scaler(needs_scaler, torch.device("cpu"))
    assert (made is not None) == scaler


@pytest.fixture
def scalers(monkeypatch):
    """Every GradScaler the run makes: it records its scale after each step, and the scaled
    loss of step OVERFLOW_AT is infinite (an fp16 overflow, injected)."""
    made = []

    class InjectedOverflowScaler(torch.amp.GradScaler):
        def __init__(self, device="cuda", **kwargs):
            super().__init__(device, init_scale=INIT_SCALE)
            self.steps, self.scales = 0, []
            made.append(self)

        def scale(self, outputs):
            self.steps += 1
            scaled = super().scale(outputs)
            return scaled * math.inf if self.steps == OVERFLOW_AT else scaled

        def update(self, new_scale=None):
            super().update(new_scale)
            self.scales.append(self.get_scale())

    monkeypatch.setattr(torch.amp, "GradScaler", InjectedOverflowScaler)
    return made


def assert_scaler_used(made, output):
    """One scaler, its scale halved exactly at the injected overflow and never otherwise; the
    losses logged are finite, and so are the saved weights (the overflowing step was skipped)."""
    assert len(made) == 1
    scales = made[0].scales
    assert len(scales) >= OVERFLOW_AT + 1
    assert scales == [INIT_SCALE] * (OVERFLOW_AT - 1) + [INIT_SCALE / 2] * (
        len(scales) - OVERFLOW_AT + 1)
    with open(os.path.join(output, "metrics.json")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == len(scales) and all(math.isfinite(x) for x in losses)
    ck = safe_load.load_torch(os.path.join(output, "checkpoint_last.pth.tar"))
    assert ck["scaler"]["scale"] == INIT_SCALE / 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values()
               if v.dtype.is_floating_point)


def test_moco_pretraining_fp16_uses_the_scaler(tmp_path, labeled_images, scalers):
    out = str(tmp_path / "moco")
    args = main_moco.get_args_parser().parse_args(
        ["--data", labeled_images, "--output", out, "--arch", "resnet18", "--batch-size", "4",
         "--moco-k", "8", "--image-size", "32", "--shuffle-groups", "2", "--workers", "0",
         "--precision", "fp16", "--max-iters", "3", "--print-freq", "1"])
    main_moco.main(args)
    assert_scaler_used(scalers, out)


def test_linear_classification_fp16_uses_the_scaler(tmp_path, labeled_images, scalers):
    torch.manual_seed(0)
    encoder = torchvision.models.resnet18().state_dict()
    pretrained = str(tmp_path / "moco.pth.tar")
    torch.save({"arch": "resnet18", "epoch": 1,
                "state_dict": {f"module.encoder_q.{k}": v for k, v in encoder.items()}},
               pretrained)
    out = str(tmp_path / "lin")
    args = main_lincls.get_args_parser().parse_args(
        ["--data", labeled_images, "--pretrained", pretrained, "--output", out, "--epochs", "1",
         "--batch-size", "4", "--image-size", "32", "--workers", "0", "--precision", "fp16",
         "--print-freq", "1"])
    main_lincls.main(args)
    assert_scaler_used(scalers, out)


def test_supervised_baseline_fp16_uses_the_scaler(tmp_path, labeled_images, scalers):
    out = str(tmp_path / "sup")
    args = main_supervised.get_args_parser().parse_args(
        ["--data", labeled_images, "--output", out, "--arch", "resnet18", "--epochs", "1",
         "--batch-size", "4", "--image-size", "32", "--workers", "0", "--precision", "fp16",
         "--print-freq", "1"])
    main_supervised.main(args)
    assert_scaler_used(scalers, out)
