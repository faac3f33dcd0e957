#!/usr/bin/env python
"""Convert a pretrained ResNet checkpoint into detectron2's format.

    python convert/to_detectron2.py IN [OUT] [--key a.b.c] [--prefix P] [--trust-checkpoint]

IN: MoCo v1/v2 (reference code or this project's `make pretrain`), MoCo v3, BYOL-style
(online/target), DINO (teacher/student), VISSL trunks, PixPro-style, ``backbone.``-prefixed
(mmselfsup, solo-learn), torchvision/timm ResNets, SwAV and this project's supervised baseline
(.pth/.pth.tar/.pt/.torch or .safetensors, with or without DDP's ``module.``), or a detectron2
.pkl (validated and passed through). Any other layout: ``--key`` names the sub-dict holding the
weights and ``--prefix`` where the ResNet's keys start. Where a method trains several encoders,
the one it evaluates with is taken, and the output says which (the options take another).
OUT defaults to IN with a ``.pkl`` suffix. Checkpoints are read as data only
(``safe_load.py``); ``--trust-checkpoint`` loads one that holds more.

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

from convert import finite, safe_load  # noqa: E402
from convert.errors import UserError  # noqa: E402
from convert.files import atomic_open, sha256_of  # noqa: E402
from convert.formats import (BGR_MSRA, FORMATS, RGB_TORCHVISION, custom_format,  # noqa: E402
                             default_state_dict, detect, sub_dict)
from convert.resnet_check import BackboneMismatch, detectron2_resnet_config, identify  # noqa: E402

METADATA_KEY = "moco_transfer"
# authors of detectron2 .pkl files whose weights expect RGB input with torchvision's statistics
RGB_AUTHORS = {f.author.upper() for f in FORMATS if f.normalization is RGB_TORCHVISION} | {
    "CUSTOM"}


class ConversionError(UserError):
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
def load_checkpoint(path, trust=False):
    """The file's content, read as data only (convert/safe_load.py)."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        return safe_load.load(path, trust)
    except safe_load.UnreadableCheckpoint as e:  # not a checkpoint, or damaged: one line
        raise ConversionError(str(e)) from None
    except UserError:  # refused
        raise
    except Exception as e:  # truncated zip, not a pickle, random bytes, ...
        raise ConversionError(
            f"{path}: cannot be read as a PyTorch checkpoint, safetensors file or pickle "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})."
            " Is the file complete?"
        ) from e


def _layout_hint(ckpt):
    sd = default_state_dict(ckpt)
    if sd:
        prefixes = sorted({str(k).split(".")[0] for k in sd})
        return f"the state dict's top-level prefixes are {prefixes[:20]}"
    return f"the checkpoint's top-level keys are {sorted(map(str, ckpt))[:20]}"


def find_weights(ckpt, path, key=None, prefix=None):
    """(format, state dict) of the ResNet in a loaded checkpoint: the layout the user named
    (--key/--prefix), else the first known one found."""
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    _string_keys(sub_dict(ckpt, key) if key else default_state_dict(ckpt), path)
    if key is None and prefix is None:
        if default_state_dict(ckpt) == {}:
            raise ConversionError(f"{path}: the state dict is empty")
        found = detect(ckpt)
        if found:
            return found
        raise ConversionError(
            f"{path}: no ResNet backbone found in any known layout "
            f"({', '.join(f.name for f in FORMATS)}); {_layout_hint(ckpt)}. Name the weights "
            "with --key a.b.c (the sub-dict holding them) and --prefix P (where the ResNet's "
            "keys start)")
    if key is not None and not isinstance(sub_dict(ckpt, key), dict):
        raise ConversionError(f"{path}: --key {key}: no such sub-dict; {_layout_hint(ckpt)}")
    fmt = custom_format(ckpt, key, prefix)
    sd = fmt.locate(ckpt)
    if sd is None:
        raise ConversionError(
            f"{path}: no ResNet keys (conv1., layer1., ...) start with '{fmt.prefix}' at "
            f"{'--key ' + key if key else 'the state dict'}; "
            f"{_layout_hint(sub_dict(ckpt, key) if key else ckpt)}")
    return fmt, sd


def _string_keys(state_dict, path):
    """A state dict names its tensors: a key that is not a string is refused, named."""
    bad = [k for k in (state_dict if isinstance(state_dict, dict) else ())
           if not isinstance(k, str)]
    if bad:
        raise ConversionError(f"{path}: the state dict has {len(bad)} key(s) that are not "
                              f"names (e.g. {bad[0]!r} of type {type(bad[0]).__name__}); a "
                              "state dict maps tensor names to tensors")


def _tensors_only(backbone, path):
    """Every backbone entry is an array or tensor (a stranger's file may hold anything)."""
    bad = [k for k, v in backbone.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if bad:
        raise ConversionError(f"{path}: {len(bad)} backbone entries are not tensors (e.g. "
                              f"{bad[0]}: {type(backbone[bad[0]]).__name__})")


def normalization_problem(meta):
    """What is wrong with a converted .pkl's ``moco_transfer`` metadata (its normalisation and
    ResNet config, merged into the transfer config), or None."""
    if not isinstance(meta, dict) or not isinstance(meta.get("normalization"), dict):
        return "moco_transfer is not a dict holding 'normalization'"
    norm, config = meta["normalization"], meta.get("config", {})
    if set(norm) != set(RGB_TORCHVISION) or norm["INPUT.FORMAT"] not in ("RGB", "BGR") or \
            type(norm["MODEL.RESNETS.STRIDE_IN_1X1"]) is not bool:
        return f"normalization {str(norm)[:120]} is not {{INPUT.FORMAT, PIXEL_MEAN, ...}}"
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        v = norm[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and
                all(type(x) in (int, float) and np.isfinite(x) for x in v)):
            return f"{key} {str(v)[:60]} is not 3 finite numbers"
    if not isinstance(config, dict) or not all(
            isinstance(k, str) and k.startswith("MODEL.RESNETS.") and
            (type(v) in (int, float, bool) or (isinstance(v, str) and len(v) <= 32))
            for k, v in config.items()):
        return f"config {str(config)[:120]} is not MODEL.RESNETS.* settings"
    return None


def _finite(model, path, allow):
    """Refuse NaN/Inf weights, naming the tensors (``--allow-nonfinite``: let them through)."""
    found = finite.nonfinite(model)
    if found and not allow:
        raise ConversionError(f"{path}: {len(found)} tensor(s) hold NaN or Inf: "
                              f"{finite.describe(found)}; {finite.ALLOW_FLAG} converts them "
                              "anyway (for debugging)")


def _to_numpy(v):
    if isinstance(v, np.ndarray):
        return v
    return v.detach().cpu().numpy()


# ---------------------------------------------------------------- conversion
def convert_state_dict(fmt, state_dict, claimed_arch=None, path="checkpoint"):
    """Return (arch, d2_model, dropped, heads) for the ResNet of `fmt` in a state dict."""
    backbone, dropped, heads = fmt.extract(state_dict)
    _tensors_only(backbone, path)
    try:
        arch = identify(backbone, claimed_arch)
    except BackboneMismatch as e:
        raise ConversionError(f"{path} ({fmt.description}): {e}") from None
    model = OrderedDict((torchvision_to_detectron2(k), _to_numpy(v)) for k, v in backbone.items())
    return arch, model, dropped, heads


def caffe2_as_detectron2(data):
    """A Caffe2-era weights pickle (MSRA's ImageNetPretrained/MSRA/R-50.pkl: blob name ->
    array, at the top or under 'blobs') as detectron2's checkpointer reads it: {'model': blobs
    without the '_momentum' ones, '__author__': 'Caffe2'}; anything else unchanged."""
    if not isinstance(data, dict) or "model" in data:
        return data
    blobs = data.get("blobs", data)
    if not (isinstance(blobs, dict) and blobs and "conv1_w" in blobs
            and all(isinstance(v, np.ndarray) for v in blobs.values())):
        return data
    return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")},
            "__author__": "Caffe2", "matching_heuristics": True}


def convert_detectron2_pkl(data, path):
    """Validate a detectron2 .pkl ({'model': ..., '__author__': ...}) and pass it through."""
    data = caffe2_as_detectron2(data)
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
        raise ConversionError(f"{path}: a .pkl must be detectron2's {{'model': ..., '__author__'}}")
    model = data["model"]
    _string_keys(model, path)
    if METADATA_KEY in data:
        meta = data[METADATA_KEY]
        problem = normalization_problem(meta)
        if problem:
            raise ConversionError(f"{path}: {problem}; re-convert the source checkpoint")
        normalization = meta["normalization"]
    elif any(k.endswith("_bn_s") or k == "conv1_w" for k in model):
        # Caffe2 blob names (MSRA R-50.pkl and friends): detectron2 renames them at load.
        author = data.get("__author__", "Caffe2")
        return data, {"format": "detectron2_caffe2", "author": author, "arch": None,
                      "normalization": BGR_MSRA, "config": {}}, []
    else:
        author = str(data.get("__author__", ""))
        if author.upper() in RGB_AUTHORS:
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
    _tensors_only(backbone, path)
    try:
        arch = identify(backbone, meta.get("arch"))
    except BackboneMismatch as e:
        raise ConversionError(f"{path} (detectron2 .pkl): {e}") from None
    info = {"format": "detectron2", "author": data.get("__author__"), "arch": arch,
            "normalization": normalization, "config": detectron2_resnet_config(arch)}
    return data, info, []


def convert(path, input_format=None, key=None, prefix=None, trust=False, allow_nonfinite=False):
    """Convert the checkpoint at `path`; returns (pickle dict to write, summary dict).
    `key`/`prefix`: where the weights are, for a layout the converter does not know (or to take
    another of a method's encoders); `trust`: full unpickling (--trust-checkpoint);
    `allow_nonfinite`: NaN/Inf weights are converted (--allow-nonfinite)."""
    raw = load_checkpoint(path, trust)
    if path.endswith(".pkl"):
        if key is not None or prefix is not None:
            raise ConversionError(f"{path}: --key/--prefix are for PyTorch and safetensors "
                                  "checkpoints; a detectron2 .pkl is passed through as it is")
        data, info, dropped = convert_detectron2_pkl(raw, path)
        _finite(data["model"], path, allow_nonfinite)
        if input_format:
            info["normalization"] = RGB_TORCHVISION if input_format == "rgb" else BGR_MSRA
        info.update(source=os.path.abspath(path), sha256=sha256_of(path), epoch=None,
                    tensors=len(data["model"]), dropped=dropped, heads=[])
        out = dict(data)
        out[METADATA_KEY] = {k: v for k, v in info.items() if k not in ("dropped", "heads")}
        out.setdefault("matching_heuristics", True)
        return out, info
    fmt, state_dict = find_weights(raw, path, key, prefix)
    claimed = raw.get("arch")
    arch, model, dropped, heads = convert_state_dict(fmt, state_dict, claimed, path)
    _finite(model, path, allow_nonfinite)
    normalization = fmt.normalization
    if input_format:
        normalization = RGB_TORCHVISION if input_format == "rgb" else BGR_MSRA
    info = {
        "format": fmt.name,
        "format_description": fmt.description,
        "author": fmt.author,
        "encoder": fmt.encoder,
        "key": fmt.key,
        "prefix": fmt.prefix,
        "arch": arch,
        "epoch": raw.get("epoch"),
        "source": os.path.abspath(path),
        "sha256": sha256_of(path),
        "normalization": normalization,
        "config": detectron2_resnet_config(arch),
        "tensors": len(model),
    }
    out = {"model": model, "__author__": fmt.author, "matching_heuristics": True,
           METADATA_KEY: dict(info)}
    info["dropped"], info["heads"] = dropped, heads
    info["others"] = fmt.others_present(raw)
    return out, info


def read_resnet(path, key=None, prefix=None, trust=False):
    """(format name, torchvision-named backbone {name: tensor or array}, arch) of any checkpoint
    the converter reads: what a reader of the ResNet itself (linear classification) needs."""
    raw = load_checkpoint(path, trust)
    if path.endswith(".pkl"):
        data, info, _ = convert_detectron2_pkl(raw, path)
        if info["format"] == "detectron2_caffe2":
            raise ConversionError(f"{path}: Caffe2 blob names (MSRA's R-50) are read by "
                                  "detectron2 only; give a PyTorch checkpoint")
        backbone = OrderedDict((detectron2_to_torchvision(k), v) for k, v in data["model"].items()
                               if not k.startswith("stem.fc."))
        return info["format"], backbone, info["arch"]
    fmt, state_dict = find_weights(raw, path, key, prefix)
    backbone, _, _ = fmt.extract(state_dict)
    try:
        arch = identify(backbone, raw.get("arch"))
    except BackboneMismatch as e:
        raise ConversionError(f"{path} ({fmt.description}): {e}") from None
    return fmt.name, backbone, arch


def write_atomic(obj, out_path):
    with atomic_open(out_path, "wb") as f:
        pickle.dump(obj, f)


def default_output(path):
    for ext in (".pth.tar", ".pth", ".pt", ".tar", ".torch", ".safetensors", ".pkl"):
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


def _encoder_line(info):
    """Which of a method's encoders was taken, and how to take another."""
    others = "; ".join(f"{name} in the file too (take it with {option})"
                       for name, option in info["others"])
    return f"{info['encoder']}" + (f"; {others}" if others else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint to convert (.pth, .pth.tar, .pt, .torch, "
                        ".safetensors or .pkl)")
    parser.add_argument("output", nargs="?", help="output .pkl (default: IN with .pkl)")
    parser.add_argument("--input-format", choices=["rgb", "bgr"],
                        help="override the input normalisation the weights expect")
    parser.add_argument("--key", help="dotted path of the sub-dict holding the weights "
                        "(e.g. student, or classy_state_dict.base_model.model.trunk)")
    parser.add_argument("--prefix", help="where the ResNet's keys start in it (e.g. encoder_k.; "
                        "'' for bare conv1./layer1. keys)")
    parser.add_argument(safe_load.TRUST_FLAG, action="store_true", help=safe_load.TRUST_HELP)
    parser.add_argument(finite.ALLOW_FLAG, action="store_true", help=finite.ALLOW_HELP)
    parser.add_argument("--verbose", action="store_true", help="print every renamed key")
    args = parser.parse_args(argv)
    out_path = args.output or default_output(args.input)
    try:
        obj, info = convert(args.input, args.input_format, args.key, args.prefix,
                            args.trust_checkpoint, args.allow_nonfinite)
    except UserError as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 1
    if args.verbose:
        for k in obj["model"]:
            print(f"  {k}")
    write_atomic(obj, out_path)
    norm = info["normalization"]
    print(f"format      : {info['format']} ({info.get('format_description', info.get('author'))})")
    if info.get("encoder"):
        print(f"encoder     : {_encoder_line(info)}")
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
