"""convert/to_detectron2.py: exact outputs for every format, loud failures, nothing half-written."""
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from convert.to_detectron2 import ConversionError, convert, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_rename(key):
    """The reference MoCo converter's rules, written out independently as an ordered table."""
    k = key
    if not k.startswith("layer"):
        k = "stem." + k
    k = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", k)
    k = re.sub(r"\bbn(\d)\b", r"conv\1.norm", k)
    k = k.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return k


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=128)
    sd = m.state_dict()
    for k, v in sd.items():  # distinctive values, so a mix-up of tensors shows
        if v.dtype.is_floating_point:
            v.copy_(torch.randn_like(v))
    return sd


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(1)
    sd = torchvision.models.resnet18().state_dict()
    for v in sd.values():  # BN would otherwise be all ones/zeros: a dropped or default tensor shows
        if v.dtype.is_floating_point:
            v.copy_(torch.randn_like(v))
    return sd


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def sgd_state(params=2):
    """An SGD optimizer's state_dict after one step (momentum buffers), as checkpoints hold."""
    weights = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(params)]
    opt = torch.optim.SGD(weights, lr=0.03, momentum=0.9, weight_decay=1e-4)
    sum(w.sum() for w in weights).backward()
    opt.step()
    return opt.state_dict()


def moco_checkpoint(sd, ddp=True):
    """The reference MoCo checkpoint: {epoch, arch, state_dict, optimizer} (main_moco.py)."""
    p = "module." if ddp else ""
    state = {f"{p}encoder_q.{k}": v for k, v in sd.items()}
    state.update({f"{p}encoder_k.{k}": v + 1 for k, v in sd.items()})
    state[f"{p}queue"] = torch.randn(128, 256)
    state[f"{p}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": sgd_state()}


def assert_exact_backbone(model, sd):
    expected = {reference_rename(k): v for k, v in sd.items() if not k.startswith("fc.")}
    assert set(model) == set(expected)
    for k, v in expected.items():
        assert isinstance(model[k], np.ndarray)
        np.testing.assert_array_equal(model[k], v.numpy())


@pytest.mark.parametrize("ext", [".pth.tar", ".pth", ".pt"])
@pytest.mark.parametrize("ddp", [True, False])
def test_moco_v1_v2_matches_reference_rules(tmp_path, r50, ext, ddp):
    path = save(moco_checkpoint(r50, ddp), tmp_path / f"moco{ext}")
    out, info = convert(path)
    assert out["__author__"] == "MOCO" and out["matching_heuristics"] is True
    assert info["format"] == "moco" and info["arch"] == "resnet50" and info["epoch"] == 200
    assert len(out["model"]) == 318
    assert sum(not k.endswith("num_batches_tracked") for k in out["model"]) == 265
    assert_exact_backbone(out["model"], r50)
    assert not any(k.startswith("stem.fc") for k in out["model"])  # head dropped ...
    assert sorted(info["heads"]) == ["encoder_q.fc.bias", "encoder_q.fc.weight"]  # ... and listed
    assert "queue" in info["dropped"] and "encoder_k.conv1.weight" in info["dropped"]
    assert out["moco_transfer"]["normalization"]["INPUT.FORMAT"] == "RGB"
    assert out["moco_transfer"]["normalization"]["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    import hashlib

    assert out["moco_transfer"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_moco_v2_mlp_head_dropped(tmp_path, r50):
    ck = moco_checkpoint(r50)
    sd = ck["state_dict"]
    for k in [k for k in sd if ".fc." in k]:
        del sd[k]
    sd["module.encoder_q.fc.0.weight"] = torch.randn(2048, 2048)
    sd["module.encoder_q.fc.2.weight"] = torch.randn(128, 2048)
    out, info = convert(save(ck, tmp_path / "v2.pth.tar"))
    assert_exact_backbone(out["model"], r50)
    assert sorted(info["heads"]) == ["encoder_q.fc.0.weight", "encoder_q.fc.2.weight"]


FORMATS = {
    "moco_v3": lambda sd: {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                                          **{f"module.momentum_encoder.{k}": v for k, v in sd.items()},
                                          "module.predictor.0.weight": torch.randn(4, 4)}},
    "pixpro": lambda sd: {"model": {**{f"module.encoder.{k}": v for k, v in sd.items()},
                                    **{f"module.encoder_k.{k}": v for k, v in sd.items()},
                                    "module.projector.linear1.weight": torch.randn(4, 4)}},
    "backbone": lambda sd: {"state_dict": {f"backbone.{k}": v for k, v in sd.items()
                                           if not k.startswith("fc.")},
                            # mmcv's meta (mmselfsup 0.x); numpy scalars among the hook messages
                            "meta": {"mmcv_version": "1.4.0", "time": "Mon Jan  3 10:00:00 2022",
                                     "epoch": 200, "iter": 250200, "config": "model = dict()",
                                     "hook_msgs": {"best_score": np.float64(0.5),
                                                   "last_ckpt": "epoch_200.pth"}},
                            "optimizer": sgd_state()},
    "torchvision": lambda sd: dict(sd),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_other_formats_are_recognised_and_exact(tmp_path, r50, fmt):
    out, info = convert(save(FORMATS[fmt](r50), tmp_path / "x.pth"))
    assert info["format"] == fmt
    assert_exact_backbone(out["model"], r50)
    assert info["arch"] == "resnet50"


def test_project_supervised_baseline_and_resnet18(tmp_path, r18):
    ck = {"epoch": 5, "arch": "resnet18", "format": "moco-transfer-supervised",
          "state_dict": {f"module.{k}": v for k, v in r18.items()}, "optimizer": {}}
    out, info = convert(save(ck, tmp_path / "sup.pth.tar"))
    assert info["format"] == "torchvision" and info["arch"] == "resnet18"
    assert_exact_backbone(out["model"], r18)
    assert info["config"] == {"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64}


def test_detectron2_pkl_is_validated_and_passed_through(tmp_path, r50):
    out, _ = convert(save(moco_checkpoint(r50), tmp_path / "m.pth.tar"))
    pkl = tmp_path / "m.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": out["model"], "__author__": "MOCO", "matching_heuristics": True}, f)
    out2, info = convert(str(pkl))
    assert info["format"] == "detectron2" and info["arch"] == "resnet50"
    assert out2["model"] is not None and set(out2["model"]) == set(out["model"])
    assert out2["moco_transfer"]["normalization"]["INPUT.FORMAT"] == "RGB"


def test_msra_style_pkl_of_numpy_arrays_passes_through(tmp_path):
    """A Caffe2-era .pkl (protocol 2, blob names, numpy arrays and scalars, __author__), as
    detectron2's ImageNetPretrained/MSRA/R-50.pkl is, is read as data and passed through."""
    blobs = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "res_conv1_bn_s": np.ones(64),
             "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32), "lr": np.float32(0.1)}
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": blobs, "__author__": "Detectron"}, f, protocol=2)
    out, info = convert(str(path))
    assert info["format"] == "detectron2_caffe2" and info["normalization"]["INPUT.FORMAT"] == "BGR"
    np.testing.assert_array_equal(out["model"]["res_conv1_bn_s"], np.ones(64))


def test_cli_writes_atomically_with_summary(tmp_path, r50):
    path = save(moco_checkpoint(r50), tmp_path / "ck.pth.tar")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "to_detectron2.py"), path],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "format      : moco" in res.stdout and "encoder_q.fc.* (2)" in res.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with open(tmp_path / "ck.pkl", "rb") as f:  # the written file, every tensor exact
        written = pickle.load(f)
    assert written["__author__"] == "MOCO" and written["moco_transfer"]["format"] == "moco"
    assert_exact_backbone(written["model"], r50)
    assert "tensors     : 318 written" in res.stdout


def _vit_state():
    return {"state_dict": {"module.encoder_q.patch_embed.proj.weight": torch.randn(8, 3, 16, 16),
                           "module.encoder_q.blocks.0.attn.qkv.weight": torch.randn(24, 8)}}


BAD = {
    "not_a_checkpoint": (lambda p: p.write_text("this is not a checkpoint"), "cannot be read"),
    "truncated": (None, "cannot be read"),
    "vit": (lambda p: torch.save(_vit_state(), p), "no ResNet backbone found"),
    "missing_layers": (None, "missing: layer4"),
    "empty": (lambda p: torch.save({"state_dict": {}}, p), "state dict is empty"),
    "unknown_prefix": (None, "no ResNet backbone found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, r50, case, capsys):
    path = tmp_path / "bad.pth"
    make, message = BAD[case]
    if case == "truncated":
        torch.save(moco_checkpoint(r50), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "missing_layers":
        torch.save({"arch": "resnet50", "state_dict": {
            f"module.encoder_q.{k}": v for k, v in r50.items() if not k.startswith("layer4")}},
            path)
    elif case == "unknown_prefix":
        torch.save({"state_dict": {f"module.encoder_x.{k}": v for k, v in r50.items()}}, path)
    else:
        make(path)
    with pytest.raises(ConversionError, match=message):
        convert(str(path))
    assert main([str(path), str(tmp_path / "out.pkl")]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]
