"""Fuzzing the checkpoint loader (issue 40): real-layout files (a MoCo .pth.tar, a torchvision
.pth, a detectron2 .pkl, a .safetensors) mutated CASES times each from SEED (bit flips,
truncations, pickle-opcode splices, swapped GLOBAL names; header edits for safetensors), each
loaded by ``convert/safe_load.py`` in a forked worker (tests/isolated.py), so a segfault or a
stall is a reported failure. Every load either returns plain data (containers, numbers,
strings, numeric arrays and tensors, Namespace), the original's own data when the mutation
left the file as it was, or fails in one line (the loader's UserError), within SECONDS and
MEGABYTES; nothing crashes the interpreter.
"""
import argparse
import collections
import io
import json
import os
import pickle
import pickletools
import random
import struct
import zipfile

import numpy as np
import pytest
import torch
import torchvision

from convert import safe_load
from convert.errors import UserError
from tests.isolated import run_cases

SEED, CASES = 40, 2000
SECONDS, MEGABYTES = 5, 200  # per load: wall time, growth of peak resident memory
# what a swapped GLOBAL names instead: code, torch-admitted types, admitted ones misplaced
GLOBALS = [("posix", "system"), ("builtins", "eval"), ("traceback", "FrameSummary"),
           ("builtins", "bytearray"), ("numpy", "ndarray"), ("numpy", "dtype"),
           ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
           ("collections", "OrderedDict"), ("argparse", "Namespace"), ("torch", "FloatStorage"),
           ("torch._utils", "_rebuild_tensor_v2"), ("builtins", "set"), ("_codecs", "encode"),
           ("torch", "Size"), ("builtins", "getattr")]
OPCODES = [op.code.encode("latin1") for op in pickletools.opcodes]


# ---------------------------------------------------------------- the originals
def originals():
    """{format: (file name, bytes)}: small files in each format's real layout."""
    net = torchvision.models.resnet18()
    stem = {k: v for k, v in net.state_dict().items() if k.startswith(("conv1.", "bn1."))}
    opt = torch.optim.SGD([net.conv1.weight], lr=0.03, momentum=0.9)
    net.conv1.weight.grad = torch.ones_like(net.conv1.weight)
    opt.step()
    moco = io.BytesIO()
    torch.save({"epoch": 200, "arch": "resnet18",
                "state_dict": {f"module.encoder_q.{k}": v for k, v in stem.items()},
                "optimizer": opt.state_dict(), "args": argparse.Namespace(lr=0.03, moco_k=65536)},
               moco)
    tv = io.BytesIO()
    torch.save(net.layer2[0].downsample.state_dict(), tv)  # an OrderedDict with _metadata
    d2 = io.BytesIO()
    pickle.dump({"model": {("stem." if k.startswith("conv1") else "stem.conv1.norm.") +
                           k.split(".", 1)[1]: v.numpy() for k, v in stem.items()},
                 "__author__": "MOCO", "matching_heuristics": True,
                 "moco_transfer": {"format": "moco", "epoch": 200, "arch": "resnet18",
                                   "normalization": {"MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53]},
                                   "scale": np.float32(1.5)}}, d2)
    from safetensors.torch import save

    return {"moco": ("moco.pth.tar", moco.getvalue()), "torchvision": ("tv.pth", tv.getvalue()),
            "detectron2": ("d2.pkl", d2.getvalue()),
            "safetensors": ("w.safetensors", save({k: v.contiguous() for k, v in stem.items()}))}


# ---------------------------------------------------------------- mutations
def flip_bits(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(rng, data):
    return data[:rng.randrange(len(data))]


def splice_opcode(rng, data):
    """An opcode (with a few random argument bytes) inserted or written over, or a slice of
    the pickle copied elsewhere."""
    at = rng.randrange(len(data))
    if rng.random() < 0.5:
        piece = rng.choice(OPCODES) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 4)))
    else:
        start = rng.randrange(len(data))
        piece = data[start:start + rng.randint(1, 64)]
    end = at + (len(piece) if rng.random() < 0.5 else 0)
    return data[:at] + piece + data[end:]


def swap_global(rng, data):
    """One global the pickle names (GLOBAL, or the strings before STACK_GLOBAL) replaced."""
    try:
        ops = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]
    except Exception:  # noqa: BLE001 -- the pickle is already damaged: flip instead
        return flip_bits(rng, data)
    sites = [i for i, (name, _, _) in enumerate(ops) if name == "GLOBAL"] + \
        [i - 2 for i, (name, _, _) in enumerate(ops) if name == "STACK_GLOBAL" and i >= 2]
    if not sites:
        return flip_bits(rng, data)
    i = rng.choice(sites)
    module, name = rng.choice(GLOBALS)
    _, _, pos = ops[i]
    if ops[i][0] == "GLOBAL":
        end = ops[i + 1][2]
        return data[:pos] + f"c{module}\n{name}\n".encode() + data[end:]
    end = ops[i + 2][2]
    strings = b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name))
    return data[:pos] + strings + data[end:]


PICKLE_MUTATIONS = [flip_bits, truncate, splice_opcode, swap_global]


def torch_mutation(rng, data):
    """Half the cases mutate the archive's bytes; half its data.pkl, archived again (so that
    the loader, not the zip checksum, meets the mutation)."""
    if rng.random() < 0.5:
        return rng.choice([flip_bits, truncate])(rng, data)
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("/data.pkl"):
                body = rng.choice(PICKLE_MUTATIONS)(rng, body)
            dst.writestr(info.filename, body)
    return out.getvalue()


def safetensors_mutation(rng, data):
    """Bit flips and truncations, or the JSON header edited: a dtype, a shape or an offset."""
    if rng.random() < 0.4:
        return rng.choice([flip_bits, truncate])(rng, data)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry, what = header[name], rng.choice(["dtype", "shape", "data_offsets"])
    if what == "dtype":
        entry["dtype"] = rng.choice(["F64", "I64", "BOOL", "U8", "F16", "BF16", "X9"])
    else:
        value = rng.choice([0, 1, 2 ** 31, 2 ** 62, -1, rng.randrange(10 ** 6)])
        if entry[what]:
            entry[what][rng.randrange(len(entry[what]))] = value
        else:  # a scalar's shape []: give it a dimension
            entry[what].append(value)
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + n:]


MUTATE = {"moco": torch_mutation, "torchvision": torch_mutation,
          "detectron2": lambda rng, d: rng.choice(PICKLE_MUTATIONS)(rng, d),
          "safetensors": safetensors_mutation}


# ---------------------------------------------------------------- what a load may return
PLAIN = (dict, list, tuple, set, frozenset, str, bytes, int, float, bool, type(None), complex,
         argparse.Namespace, torch.Size, torch.device, torch.dtype, np.generic, np.dtype)


def plain(obj, budget=100_000):
    """Whether `obj` is plain data: containers of numbers, strings, numeric numpy arrays and
    scalars, tensors and Namespaces (walked up to `budget` objects)."""
    todo, seen = [obj], 0
    while todo:
        x = todo.pop()
        seen += 1
        if seen > budget:
            return False
        if isinstance(x, np.ndarray) or isinstance(x, np.generic):
            if x.dtype.kind not in "biufc" or x.dtype.hasobject:
                return False
        elif isinstance(x, torch.Tensor):
            pass
        elif not isinstance(x, PLAIN):
            return False
        if isinstance(x, dict):
            todo += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo += list(x)
        elif isinstance(x, argparse.Namespace):
            todo += list(vars(x).values())
    return True


def same(a, b):
    """Whether two loaded checkpoints hold the same data."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b) and a.dtype == b.dtype
    return type(a) is type(b) and (a == b or a != a)


def verdict(path, original=None):
    """'loaded', 'original' or 'refused' (one line); anything else is the failure, in words."""
    try:
        data = safe_load.load(path)
    except UserError as e:
        return "refused" if "\n" not in str(e) and str(e).startswith(path) else \
            f"FAIL not one line: {e!r}"[:300]
    except Exception as e:  # noqa: BLE001 -- any other way out is the failure reported
        return f"FAIL {type(e).__name__}: {e}"[:300]
    if original is not None:
        return "original" if same(data, original) else "FAIL differs from the original"
    return "loaded" if plain(data) else f"FAIL not plain data: {type(data).__name__}"


@pytest.fixture(scope="module")
def sources():
    """{format: (file name, original bytes)}."""
    return originals()


def case_file(sources, fmt, i, folder):
    """(path, whether it is the original's bytes) of case `i` of a format: the original for
    i = 0, else its mutation drawn from (SEED, format, i), written under `folder`."""
    name, data = sources[fmt]
    rng = random.Random(f"{SEED}/{fmt}/{i}")
    mutated = data if i == 0 else MUTATE[fmt](rng, data)
    path = os.path.join(folder, f"{fmt}_{i:04d}_{name}")
    with open(path, "wb") as f:
        f.write(mutated)
    return path, mutated == data


def fuzz(sources, fmt, i, folder, original=None):
    """The verdict on case `i` of a format (its file removed after the load)."""
    path, is_original = case_file(sources, fmt, i, folder)
    try:
        return verdict(path, original if is_original else None)
    finally:
        os.remove(path)


def test_fuzzed_checkpoints_load_as_data_or_fail_in_one_line(sources, tmp_path):
    originals_loaded = {fmt: safe_load.load(case_file(sources, fmt, 0, str(tmp_path))[0])
                        for fmt in sources}
    cases = [(fmt, i) for fmt in sorted(sources) for i in range(CASES)]
    outcomes = run_cases(lambda c: fuzz(sources, *c, str(tmp_path), originals_loaded[c[0]]),
                         cases, SECONDS, MEGABYTES, workers=2)
    assert len(outcomes) == len(cases)
    failures, tally = [], collections.Counter()
    for (fmt, i), out in outcomes:
        ok = out.ended == "returned" and not out.value.startswith("FAIL") and \
            out.seconds < SECONDS and out.megabytes < MEGABYTES
        tally[fmt, out.value if ok else "FAIL"] += 1
        if not ok:
            failures.append(f"{fmt} case {i}: {out}")
    print(dict(sorted(tally.items())))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    for fmt in sources:  # every format exercised both ways: loads and refusals
        assert tally[fmt, "original"] >= 1 and tally[fmt, "refused"] >= CASES // 10, tally


def test_the_fuzz_catches_torch_weights_only_alone(sources, tmp_path, monkeypatch):
    """The control: with torch's ``weights_only`` alone as the loader (no scan, no one-line
    errors), the same cases end in tracebacks' exceptions: the fuzz sees a weaker loader."""
    monkeypatch.setattr(safe_load, "load_torch",
                        lambda path, trust=False: torch.load(path, weights_only=True))
    outcomes = run_cases(lambda i: fuzz(sources, "torchvision", i, str(tmp_path)),
                         list(range(1, 201)), SECONDS, MEGABYTES, workers=2)
    failed = [out.value for _, out in outcomes if str(out.value).startswith("FAIL")]
    assert len(failed) > 50, failed[:5]
