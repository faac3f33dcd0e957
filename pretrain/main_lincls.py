"""Linear classification on frozen features of a pretrained ResNet (the paper's protocol).

    python -m pretrain.main_lincls --data /path/to/imagenet/train --val-data .../val \
        --pretrained runs/pretrain/moco_v2_resnet50/checkpoint_0200.pth.tar

Defaults: fc trained 100 epochs, lr 30 (x0.1 at 60 and 80), momentum 0.9, wd 0, batch 256;
every other layer frozen and BN in eval mode. Without --val-data a fixed 20% of --data is held out.
"""
import argparse
import os
import re

import torch
import torch.nn as nn
import torchvision

from convert import safe_load, zoo
from convert.errors import UserError
from convert.logs import restores_logging
from convert.to_detectron2 import read_resnet
from convert.runtime import add_process_flags, program
from pretrain import classify


def get_args_parser():
    p = argparse.ArgumentParser("linear classification on frozen features")
    p.add_argument("--data", required=True, help="labeled ImageFolder tree")
    p.add_argument("--val-data", default="")
    p.add_argument("--quiet", action="store_true",
                   help="log to <output>/log.txt only and show a progress bar")
    p.add_argument("--pretrained", required=True,
                   help="a checkpoint in any layout the converter reads (MoCo, SwAV, DINO, "
                        "VISSL, torchvision, ...), or a published checkpoint's name (python -m "
                        "convert.zoo lists them); an existing file wins over a name")
    p.add_argument("--key", default=None, help="as the converter's --key")
    p.add_argument("--prefix", default=None, help="as the converter's --prefix")
    p.add_argument(safe_load.TRUST_FLAG, action="store_true", help=safe_load.TRUST_HELP)
    p.add_argument("--output", default="")
    p.add_argument("--arch", default=None, help="default: the checkpoint's arch")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=30.0)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--schedule", type=int, nargs="*", default=[60, 80])
    p.add_argument("--cos", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--print-freq", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    zoo.add_zoo_flags(p)
    return add_process_flags(p)


def pretrained_source(spec, opts, key=None, prefix=None):
    """(checkpoint path, key, prefix) of --pretrained: a file, or a published checkpoint's name
    (fetched and verified; its registry layout)."""
    if os.path.isfile(spec):
        return spec, key, prefix
    registry = zoo.load_registry(opts.registry)
    if spec not in registry:
        if os.sep in spec or "." in spec:
            raise UserError(f"--pretrained {spec}: no such file")
        zoo.lookup(spec, registry)  # an unknown name: the nearest and the known ones
    entry, path = zoo.resolve_source(spec, opts, registry)
    return path, key or entry.layout.get("key"), prefix or entry.layout.get("prefix")


def load_query_encoder(path, arch=None, num_classes=1000, trust=False, key=None, prefix=None):
    """A torchvision ResNet with the weights a checkpoint's method evaluates (MoCo's query
    encoder, DINO's teacher, ...: convert/formats.py); fc re-initialised."""
    _, backbone, found_arch = read_resnet(path, key, prefix, trust)
    arch = arch or found_arch
    if not (isinstance(arch, str) and re.fullmatch(r"(wide_)?res(net|next)[0-9_x]+d?", arch)
            and hasattr(torchvision.models, arch)):
        raise UserError(f"{path}: arch {str(arch)[:40]!r} is not a torchvision ResNet; give "
                        "--arch")
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    state = {k: torch.as_tensor(v) for k, v in backbone.items()}
    unexpected = [k for k in state if k not in model.state_dict()]
    if unexpected:
        raise UserError(f"{path}: encoder does not fit {arch}; unexpected {unexpected[:5]}")
    missing = model.load_state_dict(state, strict=False).missing_keys
    if set(missing) != {"fc.weight", "fc.bias"}:
        raise UserError(f"{path}: encoder does not fit {arch}; missing {missing[:5]}")
    nn.init.normal_(model.fc.weight, 0.0, 0.01)
    nn.init.zeros_(model.fc.bias)
    return model, arch


@restores_logging
def main(args):
    if not args.output:
        args.output = os.path.join(os.path.dirname(os.path.abspath(args.pretrained)), "lincls")
    device, train_set, val_set, classes = classify.setup_run(args)
    path, key, prefix = pretrained_source(args.pretrained, zoo.options_from_args(args),
                                          args.key, args.prefix)
    model, arch = load_query_encoder(path, args.arch, len(classes), args.trust_checkpoint,
                                     key, prefix)
    for name, p in model.named_parameters():
        p.requires_grad = name in ("fc.weight", "fc.bias")
    model.to(device)

    def frozen_mode(m):
        m.eval()  # BN statistics stay those of pretraining

    def ckpt(epoch, optimizer, top1):
        return {"epoch": epoch, "arch": arch, "top1": top1, "optimizer": optimizer.state_dict(),
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}

    top1 = classify.train_classifier(model, train_set, val_set, args, device,
                                     [model.fc.weight, model.fc.bias], frozen_mode, ckpt,
                                     "linear evaluation")
    print(f"linear evaluation: val top-1 {top1:.2f}%")
    return top1


if __name__ == "__main__":
    program(main, get_args_parser())
