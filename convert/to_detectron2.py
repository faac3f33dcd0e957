#!/usr/bin/env python
"""Convert a pretrained ResNet checkpoint into detectron2's format.

    python convert/to_detectron2.py IN [OUT] [--verbose]

IN: MoCo v1/v2 (reference code or this project's `make pretrain`), MoCo v3, PixPro-style,
``backbone.``-prefixed (mmselfsup, solo-learn), torchvision ResNets and this project's supervised
baseline (.pth/.pth.tar/.pt, with or without DDP's ``module.``), or a detectron2 .pkl (validated and
passed through). OUT defaults to IN with a ``.pkl`` suffix.

For MoCo v1/v2 the ``model`` dict is what the reference converter (moco/detection/
convert-pretrain-to-detectron2.py) writes: same names, same arrays, ``__author__ = "MOCO"``, except
that the projection head is dropped and listed instead of being written as ``stem.fc.*``.
Beside ``model`` the file carries ``moco_transfer``: the detected format, the input normalisation
and ResNet config the weights need (the transfer harness applies them), the source sha256,
epoch and arch.
"""
import argparse
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert.files import atomic_open, sha256_of  # noqa: E402
from convert.formats import BGR_MSRA, FORMATS, RGB_TORCHVISION, detect, strip_module  # noqa: E402
from convert.resnet_check import BackboneMismatch, detectron2_resnet_config, identify  # noqa: E402

METADATA_KEY = "moco_transfer"


class ConversionError(Exception):
    """The input cannot be turned into a complete detectron2 ResNet backbone."""


# ---------------------------------------------------------------- renaming rules (reference)
def torchvision_to_detectron2(name):
    """The reference MoCo converter's renaming of one (prefix-stripped) key."""
    if "layer" not in name:
        name = "stem." + name
    for t in [1, 2, 3, 4]:
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    name = name.replace("downsample.0", "shortcut")
    name = name.replace("downsample.1", "shortcut.norm")
    return name


def detectron2_to_torchvision(name):
    """Inverse of `torchvision_to_detectron2` (used to validate detectron2 .pkl inputs)."""
    if name.startswith("stem."):
        name = name[len("stem."):]
    name = name.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    for t in [1, 2, 3]:
        name = name.replace(f"conv{t}.norm", f"bn{t}")
    for t in [1, 2, 3, 4]:
        name = name.replace(f"res{t + 1}", f"layer{t}")
    return name


# ---------------------------------------------------------------- reading
def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        import torch

        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, not a pickle, random bytes, ...
        raise ConversionError(
            f"{path}: cannot be read as a PyTorch checkpoint or pickle "
            f"({type(e).__name__}: {e}). Is the file complete?"
        ) from e


def find_state_dict(ckpt, path):
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
        return ckpt
    raise ConversionError(
        f"{path}: found no state dict (looked for 'state_dict', 'model', or a dict of tensors); "
        f"top-level keys: {sorted(map(str, ckpt))[:20]}"
    )


def _to_numpy(v):
    if isinstance(v, np.ndarray):
        return v
    return v.detach().cpu().numpy()


# ---------------------------------------------------------------- conversion
def convert_state_dict(state_dict, claimed_arch=None, path="checkpoint"):
    """Return (format, arch, d2_model, dropped, heads) for a PyTorch state dict."""
    if not state_dict:
        raise ConversionError(f"{path}: the state dict is empty")
    sd = strip_module(OrderedDict(state_dict))
    fmt = detect(sd)
    if fmt is None:
        prefixes = sorted({k.split(".")[0] for k in sd})
        raise ConversionError(
            f"{path}: no ResNet backbone found under any known prefix "
            f"({', '.join(repr(f.prefix or '<none>') for f in FORMATS)}); "
            f"the checkpoint's top-level prefixes are {prefixes[:20]}"
        )
    backbone, dropped, heads = fmt.extract(sd)
    try:
        arch = identify(backbone, claimed_arch)
    except BackboneMismatch as e:
        raise ConversionError(f"{path} ({fmt.description}): {e}") from None
    model = OrderedDict((torchvision_to_detectron2(k), _to_numpy(v)) for k, v in backbone.items())
    return fmt, arch, model, dropped, heads


def convert_detectron2_pkl(data, path):
    """Validate a detectron2 .pkl ({'model': ..., '__author__': ...}) and pass it through."""
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
        raise ConversionError(f"{path}: a .pkl must be detectron2's {{'model': ..., '__author__'}}")
    model = data["model"]
    if METADATA_KEY in data:
        meta = data[METADATA_KEY]
        normalization = meta["normalization"]
    elif any(k.endswith("_bn_s") or k == "conv1_w" for k in model):
        # Caffe2 blob names (MSRA R-50.pkl and friends): detectron2 renames them at load.
        author = data.get("__author__", "Caffe2")
        return data, {"format": "detectron2_caffe2", "author": author, "arch": None,
                      "normalization": BGR_MSRA, "config": {}}, []
    else:
        author = str(data.get("__author__", ""))
        if author.upper() in ("MOCO", "TORCHVISION", "MOCO_V3", "PIXPRO", "BACKBONE"):
            normalization = RGB_TORCHVISION
        else:
            raise ConversionError(
                f"{path}: a detectron2 .pkl from '{author or 'unknown author'}' does not say which "
                "input normalisation its weights expect; pass --input-format rgb (torchvision "
                "mean/std) or bgr (MSRA/caffe)"
            )
        meta = {}
    backbone = OrderedDict((detectron2_to_torchvision(k), v) for k, v in model.items()
                           if not k.startswith("stem.fc."))
    try:
        arch = identify(backbone, meta.get("arch"))
    except BackboneMismatch as e:
        raise ConversionError(f"{path} (detectron2 .pkl): {e}") from None
    info = {"format": "detectron2", "author": data.get("__author__"), "arch": arch,
            "normalization": normalization, "config": detectron2_resnet_config(arch)}
    return data, info, []


def convert(path, input_format=None):
    """Convert the checkpoint at `path`; returns (pickle dict to write, summary dict)."""
    raw = load_checkpoint(path)
    if path.endswith(".pkl"):
        data, info, dropped = convert_detectron2_pkl(raw, path)
        if input_format:
            info["normalization"] = RGB_TORCHVISION if input_format == "rgb" else BGR_MSRA
        info.update(source=os.path.abspath(path), sha256=sha256_of(path), epoch=None,
                    tensors=len(data["model"]), dropped=dropped, heads=[])
        out = dict(data)
        out[METADATA_KEY] = {k: v for k, v in info.items() if k not in ("dropped", "heads")}
        out.setdefault("matching_heuristics", True)
        return out, info
    state_dict = find_state_dict(raw, path)
    claimed = raw.get("arch") if isinstance(raw, dict) else None
    fmt, arch, model, dropped, heads = convert_state_dict(state_dict, claimed, path)
    normalization = fmt.normalization
    if input_format:
        normalization = RGB_TORCHVISION if input_format == "rgb" else BGR_MSRA
    info = {
        "format": fmt.name,
        "format_description": fmt.description,
        "author": fmt.author,
        "arch": arch,
        "epoch": raw.get("epoch") if isinstance(raw, dict) else None,
        "source": os.path.abspath(path),
        "sha256": sha256_of(path),
        "normalization": normalization,
        "config": detectron2_resnet_config(arch),
        "tensors": len(model),
    }
    out = {"model": model, "__author__": fmt.author, "matching_heuristics": True,
           METADATA_KEY: dict(info)}
    info["dropped"], info["heads"] = dropped, heads
    return out, info


def write_atomic(obj, out_path):
    with atomic_open(out_path, "wb") as f:
        pickle.dump(obj, f)


def default_output(path):
    for ext in (".pth.tar", ".pth", ".pt", ".tar", ".pkl"):
        if path.endswith(ext):
            base = path[: -len(ext)]
            return base + (".d2.pkl" if ext == ".pkl" else ".pkl")
    return path + ".pkl"


def _summarize(items, depth, limit=8):
    if not items:
        return "none"
    prefixes = OrderedDict()
    for k in items:
        p = ".".join(k.split(".")[:depth])
        prefixes[p] = prefixes.get(p, 0) + 1
    parts = [f"{p}.* ({n})" if n > 1 else p for p, n in prefixes.items()]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts)} groups)" if len(parts) > limit else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint to convert (.pth, .pth.tar, .pt or .pkl)")
    parser.add_argument("output", nargs="?", help="output .pkl (default: IN with .pkl)")
    parser.add_argument("--input-format", choices=["rgb", "bgr"],
                        help="override the input normalisation the weights expect")
    parser.add_argument("--verbose", action="store_true", help="print every renamed key")
    args = parser.parse_args(argv)
    out_path = args.output or default_output(args.input)
    try:
        obj, info = convert(args.input, args.input_format)
    except ConversionError as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 1
    if args.verbose:
        for k in obj["model"]:
            print(f"  {k}")
    write_atomic(obj, out_path)
    norm = info["normalization"]
    print(f"format      : {info['format']} ({info.get('format_description', info.get('author'))})")
    print(f"arch        : {info['arch']}   epoch: {info.get('epoch')}")
    print(f"tensors     : {info['tensors']} written as detectron2 names (stem.*, res2..res5.*)")
    print(f"heads       : dropped {_summarize(info['heads'], 2)}")
    print(f"other keys  : dropped {_summarize(info['dropped'], 1)}")
    print(f"normalise   : {norm['INPUT.FORMAT']} mean {norm['MODEL.PIXEL_MEAN']} std "
          f"{norm['MODEL.PIXEL_STD']} STRIDE_IN_1X1 {norm['MODEL.RESNETS.STRIDE_IN_1X1']}")
    print(f"sha256      : {info['sha256']}")
    print(f"written     : {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
