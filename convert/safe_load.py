"""Loading a checkpoint never runs its code: the one way every stage reads a checkpoint.

A checkpoint is data: tensors, numbers, strings and containers. Python's pickle, which torch
files and detectron2 .pkl files are made of, can also carry a call to any function, made the
moment the file is unpickled. So every checkpoint the harness reads (the converter's inputs, the
transfer weights, linear classification's ``--pretrained``, pretraining's ``--resume``, and the
runs' own checkpoints at resume) is read here, as data only, from a regular file only (never a
FIFO or device), and every pickle is first scanned (``convert/pickle_scan.py``): the globals it
names, the dtypes and arrays it would build against the file's size, its object count, nesting
and shared references, all before anything is built (docs/security.md):

- torch files (.pth, .pth.tar, .pt, .torch; zip archives or legacy): the scan, then
  ``torch.load(weights_only=True)``. Admitted besides tensors: ``argparse.Namespace`` (DINO,
  SwAV and others save their arguments), numpy arrays, scalars and plain numeric dtypes. What
  torch itself registers as safe (exceptions, traceback types) is refused by the scan;
- pickles (.pkl: MSRA's R-50.pkl, the reference converter's output, ours): the scan, then a
  restricted unpickler that admits numpy arrays, dtypes and plain containers only;
- .safetensors: the safetensors library (the format holds no code).

A file that holds anything else, or more than its size can hold, is refused in one line naming
what it holds and the flag that loads it anyway (``--trust-checkpoint``; ``make ... TRUST=1``);
a damaged one (``UnreadableCheckpoint``) in one line saying what is wrong. With the flag the
file is fully unpickled, after a warning that names it and its sha256.
"""
import argparse
import io
import logging
import os
import pickle
import re
import stat
import struct
import zipfile

import numpy as np
import torch

from convert import pickle_scan
from convert.errors import UserError
from convert.files import sha256_of
from convert.pickle_scan import Damaged, NotData, OutOfBounds

logger = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint"
TRUST_HELP = ("load a checkpoint that holds more than data (unpickling it can run any code it "
              "carries): only for a file whose source you trust")
# the first pickle of a legacy (PyTorch < 1.6) torch.save file: torch's magic number
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class UnreadableCheckpoint(UserError):
    """A file that is not a checkpoint, or a damaged one (truncated, corrupted)."""


class UntrustedCheckpoint(UserError):
    """A checkpoint that holds more than data, read without --trust-checkpoint."""


class OversizedCheckpoint(UntrustedCheckpoint):
    """A checkpoint that would build more than its size can hold (a resource bomb)."""


def refusal(path, found):
    return UntrustedCheckpoint(
        f"{path}: refused to load: it holds {found}, which is not plain data (unpickling it "
        f"could run code); if you trust its source, load it with {TRUST_FLAG} "
        "(make: TRUST=1)")


def oversized(path, what):
    return OversizedCheckpoint(
        f"{path}: refused to load: it holds {what}, beyond the bounds of a checkpoint "
        f"(docs/security.md); if you trust its source, load it with {TRUST_FLAG} "
        "(make: TRUST=1)")


def unreadable(path, what):
    return UnreadableCheckpoint(f"{path}: cannot be read as a checkpoint: {what}. Is the file "
                                "complete?")


def read_regular(path):
    """The bytes of `path` if it is a regular file (never a FIFO, device or directory: opened
    without blocking, checked, then read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise UnreadableCheckpoint(f"{path}: {e.strerror.lower()}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableCheckpoint(f"{path}: not a regular file (a FIFO, device or "
                                   "directory); give a checkpoint file")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _scanned(path, scan, *args):
    """scan(*args), its refusals as one line each."""
    try:
        return scan(*args)
    except NotData as e:
        raise refusal(path, e.args[0]) from None
    except OutOfBounds as e:
        raise oversized(path, e.args[0]) from None
    except Damaged as e:
        raise unreadable(path, e.args[0]) from None


# ---------------------------------------------------------------- torch files
def torch_safe_globals():
    """What ``weights_only`` must admit besides torch's own types for what the scan admits
    (convert/pickle_scan.py): argparse.Namespace and numpy arrays, scalars and dtypes (a dtype
    is rebuilt as its own class, numpy.dtype[float32], ...)."""
    from numpy.core.multiarray import _reconstruct, scalar

    dtype_classes = sorted({type(np.dtype(t)) for t in set(np.sctypeDict.values())}, key=str)
    return [argparse.Namespace, np.ndarray, np.dtype, _reconstruct, scalar, *dtype_classes]


class Storages:
    """The storages a torch pickle names (persistent ids), checked against the file: each
    holds at most what the file gives it."""

    def __init__(self, legacy):
        self.legacy, self.sizes, self.needed = legacy, pickle_scan.storage_itemsize(), {}

    def __call__(self, pid):
        t = pid.literal()
        n = 6 if self.legacy else 5
        if not (isinstance(t, tuple) and len(t) == n and t[0] == "storage"):
            raise NotData(f"the persistent id {str(t)[:60]}")
        _, kind, key, location, numel = t[:5]
        name = kind[len("torch."):] if isinstance(kind, str) else None
        if name not in self.sizes or not isinstance(key, str) or \
                not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise NotData(f"the persistent id {str(t)[:60]}")
        nbytes = numel * self.sizes[name]
        self.needed[key] = max(self.needed.get(key, 0), nbytes)
        if self.legacy and t[5] is not None:  # a view of a storage: (key, offset, size)
            view = t[5]
            if not (isinstance(view, tuple) and len(view) == 3 and
                    all(type(x) is int and x >= 0 for x in view[1:]) and
                    view[1] + view[2] <= numel):
                raise NotData(f"the storage view {str(view)[:60]}")
            numel = view[2]
        return pickle_scan.V("storage", (numel, self.sizes[name]))


def scan_torch_zip(data):
    """Check a torch.save archive: its data.pkl under the torch rules, each storage within
    its record, nothing compressed beyond the bound."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = {i.filename: i for i in archive.infolist()}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise Damaged(f"a damaged zip archive ({e})") from None
    if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in entries):
        raise NotData("TorchScript code (an archive of torch.jit.save, not a checkpoint)")
    pkl = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise Damaged("a zip archive without torch.save's data.pkl")
    expanded = sum(i.file_size for i in entries.values())
    if expanded > pickle_scan.Rules.max_bytes(len(data)):
        raise OutOfBounds(f"a zip archive of {len(data)} bytes that expands to {expanded}")
    storages = Storages(legacy=False)
    try:
        body = archive.read(pkl[0])
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
        raise Damaged(f"a damaged zip archive ({e})") from None
    pickle_scan.scan(io.BytesIO(body), pickle_scan.torch_rules(storages), len(data))
    prefix = pkl[0][:-len("data.pkl")]
    for key, nbytes in storages.needed.items():
        entry = entries.get(f"{prefix}data/{key}")
        if entry is None or entry.file_size < nbytes:
            raise OutOfBounds(f"a storage '{key}' of {nbytes} bytes that the archive holds "
                              f"{entry.file_size if entry else 0} bytes of")


def scan_torch_legacy(data):
    """Check a legacy (PyTorch < 1.6) torch.save file: magic number, protocol and system
    pickles of literals, the data pickle under the torch rules, the storage keys; storages
    within the bytes that follow."""
    stream, plain = io.BytesIO(data), pickle_scan.Rules({})
    if pickle_scan.scan(stream, plain, len(data)).literal() != LEGACY_MAGIC:
        raise Damaged("neither a torch.save zip archive nor a legacy torch file")
    for _ in range(2):  # protocol version, system info
        pickle_scan.scan(stream, plain, len(data))
    storages = Storages(legacy=True)
    pickle_scan.scan(stream, pickle_scan.torch_rules(storages), len(data))
    pickle_scan.scan(stream, plain, len(data))  # storage keys
    needed, left = sum(storages.needed.values()), len(data) - stream.tell()
    if needed > left:
        raise OutOfBounds(f"storages of {needed} bytes in the {left} bytes that follow")


def scan_torch(data):
    if data[:4] == b"PK\x03\x04":
        return scan_torch_zip(data)
    if data[257:262] == b"ustar":
        raise NotData("a legacy tar checkpoint (PyTorch < 0.4), which only full unpickling "
                      "reads")
    return scan_torch_legacy(data)


def _not_data(message):
    """The global or class a weights_only failure names, or None (a damaged file, not code)."""
    m = re.search(r"GLOBAL (\S+)", message) or re.search(r"but got <class '([^']+)'>", message)
    return m.group(1) if m else None


def _damage(message):
    """The line of a weights_only failure that says what is wrong with the file."""
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    return m.group(1).strip() if m else (message.strip().splitlines() or [""])[0]


def load_torch(path, trust=False):
    """A torch file (zip archive or legacy), scanned (convert/pickle_scan.py), then read by
    ``torch.load(weights_only=True)``."""
    if trust:
        return _trusted_torch(path)
    data = read_regular(path)
    _scanned(path, scan_torch, data)
    with torch.serialization.safe_globals(torch_safe_globals()):
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = _not_data(str(e))
            if found is None:  # not a torch pickle at all: say what torch found wrong
                raise unreadable(path, _damage(str(e))) from None
            raise refusal(path, found) from None
        except (RuntimeError, ValueError, TypeError, KeyError, EOFError, OSError,
                AttributeError, IndexError, OverflowError, MemoryError, struct.error) as e:
            raise unreadable(path, f"{type(e).__name__}: {_damage(str(e))}") from None


# ---------------------------------------------------------------- pickles (.pkl)
class DataUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the .pkl rules admit (convert/pickle_scan.py's
    PKL_RULES: plain containers and numpy arrays, scalars and dtypes)."""

    def find_class(self, module, name):
        if pickle_scan.PKL_RULES.admits(f"{module}.{name}"):
            return super().find_class(module, name)
        raise NotData(f"{module}.{name}")


def load_pickle(path, trust=False):
    """A pickle (latin1, as detectron2 reads Caffe2-era files) of data only: scanned, then
    unpickled by ``DataUnpickler``."""
    if trust:
        return _trusted_pickle(path)
    data = read_regular(path)
    _scanned(path, pickle_scan.scan_bytes, data, pickle_scan.PKL_RULES)
    try:
        return DataUnpickler(io.BytesIO(data), encoding="latin1").load()
    except NotData as e:
        raise refusal(path, e.args[0]) from None
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError,
            struct.error) as e:
        raise unreadable(path, f"{type(e).__name__}: {_damage(str(e))}") from None


# ---------------------------------------------------------------- safetensors
def load_safetensors(path):
    """{name: tensor} of a .safetensors file (no code can hide in the format; the library
    checks every tensor against the file's bytes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_regular(path)
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise unreadable(path, f"{type(e).__name__}: {_damage(str(e))}") from None


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
    data = read_regular(path)
    _warn_trusted(path)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _trusted_pickle(path):
    data = read_regular(path)
    _warn_trusted(path)
    return pickle.load(io.BytesIO(data), encoding="latin1")
