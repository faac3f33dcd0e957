"""Supervised baseline on a labeled folder, with the pretraining recipe's budget and schedule.

    python -m pretrain.main_supervised --data /path/to/labeled/train [--arch resnet50]

Same optimiser, epochs, batch, lr schedule and precision handling as `main_moco` (lr 0.1 per
256 images, the usual supervised lr). Writes checkpoint_last.pth.tar as {epoch, arch,
state_dict: module.<torchvision keys>, optimizer, format}, which convert/to_detectron2.py reads
(RGB, torchvision normalisation). No --data: the embedded synthetic labeled folder.
"""
import argparse
import os

import torchvision

from convert import safe_load
from convert.logs import restores_logging
from convert.runtime import add_process_flags, program
from pretrain import classify
from pretrain.main_moco import EMBEDDED_DEFAULTS
from pretrain.synthetic import generate


def get_args_parser():
    p = argparse.ArgumentParser("supervised baseline")
    p.add_argument("--data", default="", help="labeled ImageFolder tree")
    p.add_argument("--val-data", default="")
    p.add_argument("--quiet", action="store_true",
                   help="log to <output>/log.txt only and show a progress bar")
    p.add_argument("--output", default="")
    p.add_argument("--arch", default=None, help="default resnet50 (resnet18 embedded)")
    p.add_argument("--epochs", type=int, default=None, help="default 200")
    p.add_argument("--batch-size", type=int, default=None, help="default 256")
    p.add_argument("--lr", type=float, default=None, help="default 0.1 * batch / 256")
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--schedule", type=int, nargs="*", default=[120, 160])
    p.add_argument("--cos", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="default 224")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="default auto (bf16 where the device has it); fp32 on the embedded data")
    p.add_argument("--print-freq", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(safe_load.TRUST_FLAG, action="store_true", help=safe_load.TRUST_HELP)
    return add_process_flags(p)


@restores_logging
def main(args):
    embedded = not args.data
    base = dict(arch="resnet50", epochs=200, batch_size=256, image_size=224, precision="auto")
    if embedded:
        args.data = os.path.join(generate(os.path.join("datasets", "synthetic")), "labeled")
        base.update({k: EMBEDDED_DEFAULTS[k] for k in ("arch", "epochs", "batch_size",
                                                       "image_size", "precision")})
        args.workers = min(args.workers, EMBEDDED_DEFAULTS["workers"])
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = 0.1 * args.batch_size / 256
    if not args.output:
        args.output = os.path.join("runs", "pretrain",
                                   f"supervised_{args.arch}" + ("_embedded" * embedded))
    device, train_set, val_set, classes = classify.setup_run(args)
    model = getattr(torchvision.models, args.arch)(num_classes=len(classes)).to(device)

    def ckpt(epoch, optimizer, top1):
        return {"epoch": epoch, "arch": args.arch, "top1": top1,
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "format": "moco-transfer-supervised",
                "classes": classes}

    top1 = classify.train_classifier(model, train_set, val_set, args, device,
                                     model.parameters(), lambda m: m.train(), ckpt,
                                     "supervised pretraining")
    print(f"supervised baseline: val top-1 {top1:.2f}%; checkpoint "
          f"{os.path.join(args.output, 'checkpoint_last.pth.tar')}")
    return os.path.join(args.output, "checkpoint_last.pth.tar")


if __name__ == "__main__":
    program(main, get_args_parser())
