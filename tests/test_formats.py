"""Checkpoints of other frameworks, each written the way that framework writes it, converted
(without --trust-checkpoint) and loaded strictly by the transfer checkpointer; where a method
trains several encoders, the one it evaluates with is taken, said, and can be overridden."""
import argparse

import numpy as np
import pytest
import torch
import torchvision

from convert.to_detectron2 import (ConversionError, convert, main, torchvision_to_detectron2,
                                   write_atomic)

TASK = "synthetic_frcnn_fpn_1k"  # an R18-FPN: every format's backbone is a ResNet-18 here


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(3)
    sd = torchvision.models.resnet18().state_dict()
    for v in sd.values():  # distinctive values: a tensor taken from the wrong encoder shows
        if v.dtype.is_floating_point:
            v.copy_(torch.randn_like(v))
    return sd


def shifted(sd, by):
    """The same keys with other values: the encoder that must not be taken."""
    return {k: v + by if v.dtype.is_floating_point else v for k, v in sd.items()}


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def sgd_state():
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.sum().backward()
    opt.step()
    return opt.state_dict()


# ---------------------------------------------------------------- writers, one per framework
def write_moco(sd, path):
    """moco/main_moco.py: DDP keys, query and key encoders, queue; the reference's dict."""
    state = {**prefixed("module.encoder_q.", sd), **prefixed("module.encoder_k.", shifted(sd, 1)),
             "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1).long()}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state,
                "optimizer": sgd_state()}, path)


def write_byol(sd, path):
    """A BYOL-style trainer: online network (encoder + projector), target network, predictor."""
    model = {**prefixed("online_network.encoder.", sd),
             "online_network.projector.net.0.weight": torch.randn(8, 512),
             **prefixed("target_network.encoder.", shifted(sd, 1)),
             "target_network.projector.net.0.weight": torch.randn(8, 512),
             "predictor.net.0.weight": torch.randn(8, 8)}
    torch.save({"epoch": 300, "model": model, "optimizer": sgd_state()}, path)


def write_dino(sd, path):
    """dino/main_dino.py's full checkpoint: student and teacher (both DDP-wrapped: a ResNet has
    BN), the optimizer, the epoch, its argparse arguments, the loss's center, no fp16 scaler."""
    head = {"head.mlp.0.weight": torch.randn(8, 512), "head.last_layer.weight_g": torch.ones(4, 1)}
    torch.save({"student": prefixed("module.", {**prefixed("backbone.", shifted(sd, 1)), **head}),
                "teacher": prefixed("module.", {**prefixed("backbone.", sd), **head}),
                "optimizer": sgd_state(), "epoch": 100,
                "args": argparse.Namespace(arch="resnet18", out_dim=65536, momentum_teacher=0.996,
                                           lr=0.0005, data_path="/datasets/imagenet/train"),
                "dino_loss": {"center": torch.zeros(1, 8)}, "fp16_scaler": None}, path)


def write_vissl(sd, path):
    """VISSL's model_final_checkpoint_phaseN.torch: the trunk's _feature_blocks and the heads
    inside classy_state_dict.base_model.model, beside the task's own state."""
    trunk = prefixed("_feature_blocks.", {k: v for k, v in sd.items() if not k.startswith("fc.")})
    classy = {"train": True, "phase_type": "train", "train_phase_idx": 199,
              "base_model": {"model": {"trunk": trunk,
                                       "heads": {"0.clf.0.weight": torch.randn(128, 512)}},
                             "meta": {}},
              "optimizer": sgd_state(), "loss": {}}
    torch.save({"phase_idx": 199, "iteration": 250200, "loss": {}, "iteration_num": 250200,
                "train_phase_idx": 199, "classy_state_dict": classy}, path)


def write_swav(sd, path):
    """swav/main_swav.py: DDP keys, the projection head and prototypes beside the trunk."""
    state = prefixed("module.", {**{k: v for k, v in sd.items() if not k.startswith("fc.")},
                                 "projection_head.0.weight": torch.randn(8, 512),
                                 "prototypes.weight": torch.randn(16, 8)})
    torch.save({"epoch": 800, "state_dict": state, "optimizer": sgd_state()}, path)


def as_sequential(sd):
    """torchvision's keys as nn.Sequential(*list(resnet.children())[:-1]) numbers them (fc gone):
    conv1 0, bn1 1, layer1..layer4 4..7."""
    number = {"conv1.": "0.", "bn1.": "1.", "layer1.": "4.", "layer2.": "5.", "layer3.": "6.",
              "layer4.": "7."}
    return {next(n + k[len(t):] for t, n in number.items() if k.startswith(t)): v
            for k, v in sd.items() if not k.startswith("fc.")}


def write_byol_sequential(sd, path):
    """Public BYOL re-implementations (an online network whose encoder is the Sequential of the
    ResNet's children, a projection MLP), each network's state dict under its own key."""
    def network(s):
        return {**prefixed("encoder.", as_sequential(s)),
                "projetion.net.0.weight": torch.randn(8, 512)}
    torch.save({"online_network_state_dict": network(sd),
                "target_network_state_dict": network(shifted(sd, 1)),
                "optimizer_state_dict": sgd_state()}, path)


def write_byol_nested(sd, path):
    """{'online_network': {'encoder.conv1.weight', ...}, 'target_network': {...}}."""
    torch.save({"online_network": {**prefixed("encoder.", sd),
                                   "projector.net.0.weight": torch.randn(8, 512)},
                "target_network": prefixed("encoder.", shifted(sd, 1)), "epoch": 3}, path)


def write_simclr_sequential(sd, path):
    """A SimCLR re-implementation's model state dict: encoder = Sequential(children), head."""
    torch.save({**prefixed("encoder.", as_sequential(sd)),
                "projection_head.0.weight": torch.randn(8, 512)}, path)


def write_safetensors(sd, path):
    """timm / a model hub's model.safetensors: bare keys (fc included), string metadata."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def write_custom(sd, path):
    """A layout no format knows: the ResNet under network.net, keys starting with 'feat.'."""
    torch.save({"network": {"net": prefixed("feat.", sd)}, "step": 10}, path)


# name: (writer, file name, options, expected format, encoder taken)
CASES = {
    "moco": (write_moco, "checkpoint_0200.pth.tar", {}, "moco", "query encoder"),
    "moco_key_encoder": (write_moco, "checkpoint_0200.pth.tar", {"prefix": "encoder_k."},
                         "custom", "--prefix 'encoder_k.'"),
    "byol": (write_byol, "byol.pth", {}, "byol", "online network"),
    "byol_target": (write_byol, "byol.pth", {"prefix": "target_network.encoder."}, "custom",
                    "--prefix 'target_network.encoder.'"),
    "dino": (write_dino, "checkpoint.pth", {}, "dino", "teacher"),
    "dino_student": (write_dino, "checkpoint.pth", {"key": "student"}, "custom",
                     "--key student --prefix 'backbone.'"),
    "vissl": (write_vissl, "model_final_checkpoint_phase199.torch", {}, "vissl", None),
    "swav": (write_swav, "swav_800ep_pretrain.pth.tar", {}, "torchvision", None),
    "byol_sequential": (write_byol_sequential, "byol.pth", {}, "byol_sequential",
                        "online network"),
    "byol_sequential_target": (write_byol_sequential, "byol.pth",
                               {"key": "target_network_state_dict"}, "custom",
                               "--key target_network_state_dict --prefix 'encoder.'"),
    "byol_nested": (write_byol_nested, "byol.pth", {}, "byol_nested", "online network"),
    "simclr_sequential": (write_simclr_sequential, "simclr.pth", {}, "sequential", None),
    "safetensors": (write_safetensors, "model.safetensors", {}, "torchvision", None),
    "custom": (write_custom, "odd.pt", {"key": "network.net", "prefix": "feat."}, "custom",
               "--key network.net --prefix 'feat.'"),
}
# the encoders an override takes: their values were shifted by 1 when written
NOT_DEFAULT = {"moco_key_encoder", "byol_target", "dino_student", "byol_sequential_target"}


@pytest.fixture(scope="module")
def model():
    from transfer.config import setup_cfg
    from transfer.trainer import Trainer

    return Trainer.build_model(setup_cfg(TASK, "random"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_framework_checkpoint_converts_and_loads_strictly(tmp_path, r18, model, case):
    from transfer.checkpoint import TransferCheckpointer, pretrained_resnet_keys
    from transfer.config import setup_cfg

    write, name, options, fmt, encoder = CASES[case]
    path = str(tmp_path / name)
    write(r18, path)
    out, info = convert(path, **options)
    assert info["format"] == fmt and info["arch"] == "resnet18"
    if encoder:
        assert encoder in info["encoder"]
    pkl = str(tmp_path / "converted.pkl")
    write_atomic(out, pkl)

    cfg = setup_cfg(TASK, pkl)  # the metadata read the way a run reads it
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.INPUT.FORMAT == "RGB"
    checkpointer = TransferCheckpointer(model)
    checkpointer.load(pkl, checkpointables=[])  # strict: raises if a ResNet tensor is unfilled
    assert len(pretrained_resnet_keys(model)) == 100
    state = model.state_dict()
    source = shifted(r18, 1) if case in NOT_DEFAULT else r18
    for key, value in source.items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(
                state["backbone.bottom_up." + torchvision_to_detectron2(key)].numpy(),
                value.numpy(), err_msg=key)


@pytest.mark.parametrize("write,method,encoder,other", [
    (write_moco, "MoCo", "query encoder",
     "key encoder in the file too (take it with --prefix encoder_k.)"),
    (write_byol, "BYOL", "online network",
     "target network in the file too (take it with --prefix target_network.encoder.)"),
    (write_dino, "DINO", "teacher", "student in the file too (take it with --key student)"),
    (write_byol_sequential, "BYOL", "online network",
     "target network in the file too (take it with --key target_network_state_dict)"),
    (write_byol_nested, "BYOL", "online network",
     "target network in the file too (take it with --key target_network)"),
])
def test_converter_says_which_encoder_it_took_and_how_to_take_another(tmp_path, r18, write,
                                                                       method, encoder, other,
                                                                       capsys):
    path = str(tmp_path / "ck.pth")
    write(r18, path)
    assert main([path]) == 0
    assert f"encoder     : {encoder} (what {method} evaluates); {other}\n" in \
        capsys.readouterr().out


def test_wrong_key_or_prefix_says_what_is_there(tmp_path, r18):
    path = str(tmp_path / "odd.pt")
    write_custom(r18, path)
    with pytest.raises(ConversionError, match=r"no ResNet backbone found in any known layout.*"
                                              r"top-level keys are \['network', 'step'\].*--key"):
        convert(path)
    with pytest.raises(ConversionError, match="--key network.nett: no such sub-dict"):
        convert(path, key="network.nett")
    with pytest.raises(ConversionError, match=r"no ResNet keys .* start with 'trunk.'.*\['feat'\]"):
        convert(path, key="network.net", prefix="trunk.")
