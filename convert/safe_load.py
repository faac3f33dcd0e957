"""Loading a checkpoint never runs its code: the one way every stage reads a checkpoint.

A checkpoint is data: tensors, numbers, strings and containers. Python's pickle, which torch
files and detectron2 .pkl files are made of, can also carry a call to any function, made the
moment the file is unpickled. So every checkpoint the harness reads (the converter's inputs, the
transfer weights, linear classification's ``--pretrained``, pretraining's ``--resume``, and the
runs' own checkpoints at resume) is read here, as data only:

- torch files (.pth, .pth.tar, .pt, .torch): ``torch.load(weights_only=True)`` plus the few
  harmless types real checkpoints carry: ``argparse.Namespace`` (DINO, SwAV and others save
  their arguments), numpy arrays, scalars and dtypes. Optimizer states are plain containers;
- pickles (.pkl: MSRA's R-50.pkl, the reference converter's output, ours): a restricted
  unpickler that admits numpy arrays, dtypes and plain containers only;
- .safetensors: the safetensors library (the format holds no code).

A file that holds anything else is refused in one line naming what it holds and the flag that
loads it anyway (``--trust-checkpoint``; ``make ... TRUST=1``). With the flag the file is fully
unpickled, after a warning that names it and its sha256.
"""
import argparse
import logging
import os
import pickle
import re

import numpy as np
import torch

from convert.errors import UserError
from convert.files import sha256_of

logger = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint"
TRUST_HELP = ("load a checkpoint that holds more than data (unpickling it can run any code it "
              "carries): only for a file whose source you trust")

# (module, name) a .pkl may name: plain containers, numpy arrays, scalars and dtypes. numpy 1.x
# and 2.x spell their modules differently; protocol-2 pickles spell bytes as _codecs.encode,
# protocol 5 spells an array as numeric._frombuffer.
PICKLE_GLOBALS = frozenset(
    [("collections", "OrderedDict"), ("_codecs", "encode"),
     ("builtins", "set"), ("builtins", "frozenset"),
     ("__builtin__", "set"), ("__builtin__", "frozenset"),  # Python 2 pickles (Detectron era)
     ("numpy", "ndarray"), ("numpy", "dtype")]
    + [(f"numpy.{core}.multiarray", n) for core in ("core", "_core")
       for n in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")])


class UntrustedCheckpoint(UserError):
    """A checkpoint that holds more than data, read without --trust-checkpoint."""


def refusal(path, found):
    return UntrustedCheckpoint(
        f"{path}: refused to load: it holds {found}, which is not plain data (unpickling it "
        f"could run code); if you trust its source, load it with {TRUST_FLAG} "
        "(make: TRUST=1)")


# ---------------------------------------------------------------- torch files
def torch_safe_globals():
    """What ``weights_only`` admits besides torch's own types: argparse.Namespace and numpy
    arrays, scalars and dtypes (a dtype is rebuilt as its own class, numpy.dtype[float32], ...)."""
    from numpy.core.multiarray import _reconstruct, scalar

    dtype_classes = sorted({type(np.dtype(t)) for t in set(np.sctypeDict.values())}, key=str)
    return [argparse.Namespace, np.ndarray, np.dtype, _reconstruct, scalar, *dtype_classes]


def _not_data(message):
    """The global or class a weights_only failure names, or None (a damaged file, not code)."""
    m = re.search(r"GLOBAL (\S+)", message) or re.search(r"but got <class '([^']+)'>", message)
    return m.group(1) if m else None


def _damage(message):
    """The line of a weights_only failure that says what is wrong with the file."""
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    return m.group(1).strip() if m else message.strip().splitlines()[0]


def load_torch(path, trust=False):
    if trust:
        return _trusted_torch(path)
    with torch.serialization.safe_globals(torch_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = _not_data(str(e))
            if found is None:  # not a torch pickle at all: say what torch found wrong
                raise pickle.UnpicklingError(_damage(str(e))) from None
            raise refusal(path, found) from None


# ---------------------------------------------------------------- pickles (.pkl)
class _NotData(Exception):
    pass


class DataUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays, scalars and dtypes."""

    def find_class(self, module, name):
        if (module, name) in PICKLE_GLOBALS or (module == "numpy.dtypes" and
                                                name.endswith("DType")):
            return super().find_class(module, name)
        raise _NotData(f"{module}.{name}")


def load_pickle(path, trust=False):
    """A pickle (latin1, as detectron2 reads Caffe2-era files) of data only."""
    if trust:
        return _trusted_pickle(path)
    with open(path, "rb") as f:
        try:
            return DataUnpickler(f, encoding="latin1").load()
        except _NotData as e:
            raise refusal(path, e.args[0]) from None


# ---------------------------------------------------------------- safetensors
def load_safetensors(path):
    """{name: tensor} of a .safetensors file (no code can hide in the format)."""
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def load(path, trust=False):
    """A checkpoint file by its extension: .pkl, .safetensors, else a torch file."""
    if path.endswith(".pkl"):
        return load_pickle(path, trust)
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return load_torch(path, trust)


# ---------------------------------------------------------------- resume
def newest_readable(paths, load, log, where, otherwise):
    """(path, content) of the first of `paths` (preferred first) that `load` reads, or
    (None, None): how every stage resumes.

    Writes are atomic, so a file that does not load is damage after the write (a copy cut
    short, a full disk, a bad sector): it is skipped, and `log` says in one line what was
    skipped and what is used instead (`where`: the folder; `otherwise`: what happens when
    nothing loads). A file that holds more than data is not damage: it is refused."""
    skipped = []
    for path in paths:
        name = os.path.basename(path)
        if not os.path.isfile(path):
            skipped.append(f"{name} (missing)")
            continue
        try:
            content = load(path)
        except UntrustedCheckpoint:
            raise
        except Exception as e:  # any way a file fails to load: skip it, say why
            skipped.append(f"{name} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})")
            continue
        if skipped:
            log.warning("unreadable checkpoint(s) %s; resuming from %s instead",
                        "; ".join(skipped), name)
        return path, content
    if skipped:
        log.warning("no readable checkpoint in %s (%s); %s", where, "; ".join(skipped),
                    otherwise)
    return None, None


# ---------------------------------------------------------------- --trust-checkpoint
def _warn_trusted(path):
    logger.warning("warning: %s: loading with full unpickling (%s): any code it carries runs; "
                   "sha256 %s", path, TRUST_FLAG, sha256_of(path))


def _trusted_torch(path):
    _warn_trusted(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _trusted_pickle(path):
    _warn_trusted(path)
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")
