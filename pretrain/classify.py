"""The classification loop shared by linear evaluation and the supervised baseline."""
import logging
import os

import torch
import torch.nn as nn

from pretrain import engine, loader

logger = logging.getLogger("pretrain")


def split_folder(folder, transform_train, transform_eval, val_folder=None, seed=0,
                 val_fraction=0.2):
    """(train set, val set): `val_folder` if given, else a fixed split of `folder`."""
    train = loader.ImageFiles(folder, transform_train, seed=seed)
    if val_folder:
        return train, loader.ImageFiles(val_folder, transform_eval)
    val = loader.ImageFiles(folder, transform_eval)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train), generator=g).tolist()
    n_val = max(1, int(len(perm) * val_fraction))
    return (torch.utils.data.Subset(train, perm[n_val:]),
            torch.utils.data.Subset(val, perm[:n_val]))


def setup_run(args):
    """Logging, seed, device and the labeled train/val sets of a classification run.
    Returns (device, train set, val set, class names)."""
    os.makedirs(args.output, exist_ok=True)
    engine.setup_logging(args.output, 0, to_console=not args.quiet)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set, val_set = split_folder(
        args.data, loader.supervised_augmentation(args.image_size),
        loader.eval_transform(args.image_size), args.val_data, args.seed)
    classes = (train_set.dataset if hasattr(train_set, "dataset") else train_set).classes
    return device, train_set, val_set, classes


@torch.no_grad()
def evaluate(model, data, device, amp_dtype):
    model.eval()
    correct = total = 0
    for x, y in data:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out = model(x.to(device))
        correct += (out.float().argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


def train_classifier(model, train_set, val_set, args, device, params, train_mode, ckpt_fn,
                     desc="training"):
    """SGD over `params` with the per-epoch schedule of args (lr, schedule, cos, epochs).

    train_mode(model) puts the model in the right mode each epoch (linear eval keeps BN in eval
    mode). ckpt_fn(epoch, optimizer, top1) returns the dict saved as checkpoint_last.pth.tar
    (the grad scaler's state is added). Resumes from checkpoint_last.pth.tar in args.output.
    Returns the final val top-1."""
    precision, amp_dtype, needs_scaler, _ = engine.resolve_precision(args.precision, device)
    scaler = engine.make_scaler(needs_scaler, device)
    optimizer = torch.optim.SGD(params, args.lr, momentum=0.9, weight_decay=args.wd)
    start_epoch = 0
    last, ck = engine.load_latest_readable(args.output, args.trust_checkpoint)
    if last:
        model.load_state_dict({k[len("module."):]: v for k, v in ck["state_dict"].items()})
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch = ck["epoch"]
        logger.info("resumed from %s at epoch %d", last, start_epoch)
    bs = min(args.batch_size, len(train_set))
    train_data = torch.utils.data.DataLoader(train_set, batch_size=bs, shuffle=True,
                                             num_workers=args.workers, drop_last=True)
    val_data = torch.utils.data.DataLoader(val_set, batch_size=bs, num_workers=args.workers)
    criterion = nn.CrossEntropyLoss()
    total = len(train_data) * args.epochs
    progress = engine.Progress(args.output, total, start_epoch * len(train_data), 0,
                               args.print_freq, bar=desc if args.quiet else None)
    it = start_epoch * len(train_data)
    top1 = None
    for epoch in range(start_epoch, args.epochs):
        lr = engine.adjust_learning_rate(optimizer, args.lr, epoch, args.epochs, args.cos,
                                         args.schedule)
        train_mode(model)
        for x, y in train_data:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                out = model(x)
            loss = criterion(out.float(), y)
            engine.optimizer_step(loss, optimizer, scaler)
            acc1 = engine.accuracy(out.float(), y)[0]
            progress.step(it, epoch, len(y), loss=loss.item(), acc1=acc1, lr=lr)
            it += 1
        top1 = evaluate(model, val_data, device, amp_dtype)
        logger.info("epoch %d: val top-1 %.2f%%", epoch, top1)
        state = dict(ckpt_fn(epoch + 1, optimizer, top1),
                     scaler=scaler.state_dict() if scaler is not None else None)
        engine.save_atomic(state, os.path.join(args.output, "checkpoint_last.pth.tar"))
    progress.close()
    return top1
