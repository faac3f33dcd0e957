"""A checkpoint is data: every entry point that reads one refuses a file whose unpickling would
run code (its payload here creates a marker file), in one line naming the global and the flag;
with --trust-checkpoint it loads, after a warning naming the file and its sha256."""
import ast
import hashlib
import os
import pickle
import shlex
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision

from convert import safe_load
from convert.runtime import entry_point

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSED = ("refused to load: it holds posix.system, which is not plain data (unpickling it could "
           "run code); if you trust its source, load it with --trust-checkpoint (make: TRUST=1)")


class Payload:
    """Unpickled, it runs a shell command (here: creating `marker`), as an attack would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def evil_moco(r18, marker, path):
    """A complete MoCo ResNet-18 checkpoint that also carries the payload."""
    state = {f"module.encoder_q.{k}": v for k, v in r18.items()}
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state, "optimizer": {},
                "extra": Payload(marker)}, path)
    return str(path)


def evil_pkl(marker, path):
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
                     "__author__": "MOCO", "extra": Payload(marker)}, f)
    return str(path)


def assert_refused_in_one_line(message, path, marker):
    assert message == f"error: {path}: {REFUSED}"
    assert not marker.exists()


# ---------------------------------------------------------------- refused everywhere
@pytest.mark.parametrize("ext", [".pth.tar", ".pkl"])
def test_converter_refuses_a_checkpoint_that_holds_code(tmp_path, r18, marker, ext, capsys):
    from convert.to_detectron2 import main

    path = (evil_pkl(marker, tmp_path / "evil.pkl") if ext == ".pkl"
            else evil_moco(r18, marker, tmp_path / f"evil{ext}"))
    assert main([path, str(tmp_path / "out.pkl")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[1:] == ["nothing was written."]
    assert_refused_in_one_line(err[0], path, marker)
    assert not (tmp_path / "out.pkl").exists()


def test_transfer_weights_refuse_a_pkl_that_holds_code(tmp_path, marker):
    from transfer.train_net import cli

    path = evil_pkl(marker, tmp_path / "evil.pkl")
    with pytest.raises(SystemExit) as e:
        cli(["--task", "synthetic_frcnn_fpn_1k", "--weights", path, "--dry-run"])
    assert_refused_in_one_line(e.value.code, path, marker)


@pytest.mark.parametrize("name", ["model_final.pth", "weights.pkl"])
def test_transfer_checkpointer_refuses_code_at_resume_and_at_load(tmp_path, r18, marker, name):
    """A run folder's checkpoint that holds code is refused, not skipped as damaged; pretrained
    weights detectron2 would unpickle itself (.pkl) are refused too."""
    from transfer.checkpoint import TransferCheckpointer

    path = tmp_path / name
    if name.endswith(".pkl"):
        evil_pkl(marker, path)
    else:
        torch.save({"model": {"weight": torch.zeros(2, 2)}, "iteration": 3,
                    "extra": Payload(marker)}, path)
    checkpointer = TransferCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    with pytest.raises(safe_load.UntrustedCheckpoint, match="posix.system"):
        checkpointer.readable_checkpoint() if name.endswith(".pth") else \
            checkpointer.load(str(path), checkpointables=[])
    assert not marker.exists()


def test_linear_classification_refuses_pretrained_weights_that_hold_code(
        tmp_path, r18, marker, labeled_images):
    from pretrain import main_lincls

    path = evil_moco(r18, marker, tmp_path / "evil.pth.tar")
    args = main_lincls.get_args_parser().parse_args(
        ["--data", labeled_images, "--pretrained", path, "--output", str(tmp_path / "lin"),
         "--workers", "0", "--precision", "fp32"])
    with pytest.raises(SystemExit) as e:
        entry_point(main_lincls.main, args)
    assert_refused_in_one_line(e.value.code, path, marker)


@pytest.mark.parametrize("where", ["--resume", "run folder"])
def test_pretraining_resume_refuses_a_checkpoint_that_holds_code(tmp_path, r18, marker,
                                                                  labeled_images, where):
    from pretrain import main_moco

    out = tmp_path / "run"
    out.mkdir()
    path = evil_moco(r18, marker, (tmp_path if where == "--resume" else out) /
                     "checkpoint_last.pth.tar")
    args = main_moco.get_args_parser().parse_args(
        ["--data", labeled_images, "--output", str(out), "--arch", "resnet18", "--batch-size", "4",
         "--moco-k", "8", "--image-size", "32", "--shuffle-groups", "2", "--workers", "0",
         "--precision", "fp32"] + (["--resume", path] if where == "--resume" else []))
    with pytest.raises(SystemExit) as e:
        entry_point(main_moco.main, args)
    assert_refused_in_one_line(e.value.code, path, marker)


# ---------------------------------------------------------------- --trust-checkpoint
def test_trusted_checkpoint_loads_with_a_warning_naming_file_and_sha256(tmp_path, r18, marker):
    path = evil_moco(r18, marker, tmp_path / "evil.pth")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "to_detectron2.py"),
                          path, "--trust-checkpoint"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert marker.exists()  # it loaded, payload included: the user's explicit choice
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert f"warning: {path}: loading with full unpickling (--trust-checkpoint): any code it " \
           f"carries runs; sha256 {digest}" in res.stderr


def test_trusted_pkl_loads_with_the_warning(tmp_path, marker, caplog):
    path = evil_pkl(marker, tmp_path / "evil.pkl")
    with caplog.at_level("WARNING"):
        data = safe_load.load_pickle(path, trust=True)
    assert marker.exists() and data["__author__"] == "MOCO"
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() in caplog.text


# ---------------------------------------------------------------- what data loads as data
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_data_unpickler_admits_containers_and_numpy(tmp_path, protocol):
    data = {"model": OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3)),
            "s": np.float64(0.5), "i": np.int64(3), "dt": np.dtype("f2"), "b": b"\x00\xff",
            "c": {1, 2}, "f": frozenset([3]), "t": (1, [2.0, None], "x")}
    path = tmp_path / "data.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    back = safe_load.load_pickle(str(path))
    np.testing.assert_array_equal(back["model"]["w"], data["model"]["w"])
    assert {k: v for k, v in back.items() if k != "model"} == \
        {k: v for k, v in data.items() if k != "model"}


# ---------------------------------------------------------------- the source itself
UNSAFE = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler")}
# the only places a file is fully unpickled: behind --trust-checkpoint
TRUSTED = {("convert/safe_load.py", "_trusted_torch"), ("convert/safe_load.py", "_trusted_pickle")}


class UnsafeLoads(ast.NodeVisitor):
    """Every full unpickling in a module: `weights_only=False`, pickle.load(s)/Unpickler, and
    torch.load without weights_only=True, with the function it is in."""

    def __init__(self):
        self.function, self.found = None, []

    def visit_FunctionDef(self, node):
        outer, self.function = self.function, node.name
        self.generic_visit(node)
        self.function = outer

    def visit_ImportFrom(self, node):
        if node.module in ("torch", "pickle") and any(a.name in ("load", "loads", "Unpickler")
                                                      for a in node.names):
            self.found.append((node.lineno, self.function, f"from {node.module} import ..."))

    def visit_Call(self, node):
        f = node.func
        name = (f.value.id, f.attr) if isinstance(f, ast.Attribute) and \
            isinstance(f.value, ast.Name) else None
        weights_only = {k.value.value for k in node.keywords if k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant)}
        if False in weights_only or (name in UNSAFE and not (name == ("torch", "load") and
                                                             weights_only == {True})):
            self.found.append((node.lineno, self.function, ast.unparse(node)[:60]))
        self.generic_visit(node)


def test_no_full_unpickling_outside_the_trusted_path():
    bad = []
    for stage in ("convert", "pretrain", "transfer", "tools", "results"):
        for folder, _, files in os.walk(os.path.join(ROOT, stage)):
            for name in sorted(f for f in files if f.endswith(".py")):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                visitor = UnsafeLoads()
                visitor.visit(ast.parse(open(os.path.join(ROOT, rel)).read()))
                bad += [f"{rel}:{line} in {fn}: {code}" for line, fn, code in visitor.found
                        if (rel, fn) not in TRUSTED]
    assert bad == []
    # ... and the walker does see one: the trusted path is where it says
    visitor = UnsafeLoads()
    visitor.visit(ast.parse(open(os.path.join(ROOT, "convert", "safe_load.py")).read()))
    assert {fn for _, fn, _ in visitor.found} == {fn for _, fn in TRUSTED}


# ---------------------------------------------------------------- real formats still load
def py2_pkl(array):
    """A Detectron-era .pkl as Python 2's cPickle wrote it (protocol 2: str data as BINSTRING,
    numpy's dtype flags as the ints 0 and 1): {'blobs': {'conv1_w': array}}."""
    data = array.astype("<f4").tobytes()
    shape = b"K" + bytes([len(array)]) + b"\x85"
    return (b"\x80\x02}q\x00U\x05blobsq\x01}U\x07conv1_wcnumpy.core.multiarray\n_reconstruct\n"
            b"q\x02cnumpy\nndarray\nq\x03K\x00\x85U\x01b\x87Rq\x04(K\x01" + shape +
            b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff"
            b"\xff\xffK\x00tb\x89T" + len(data).to_bytes(4, "little") + data + b"tbss.")


def test_every_real_format_loads_as_it_was_saved(tmp_path, r18):
    """What each format needs is admitted: a MoCo checkpoint (zip and legacy torch.save) with
    its optimizer, DINO/SwAV's argparse.Namespace, numpy scalars, torch.Size/device/dtype, a
    Parameter; a torchvision state dict (OrderedDict with _metadata); detectron2 .pkl files in
    protocols 2, 4, 5 and as Python 2 wrote them; safetensors."""
    import argparse

    from safetensors.torch import save_file

    net = torchvision.models.resnet18()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.conv1.weight.grad = torch.ones_like(net.conv1.weight)
    opt.step()
    ckpt = {"epoch": 3, "arch": "resnet18", "optimizer": opt.state_dict(),
            "state_dict": {f"module.encoder_q.{k}": v for k, v in r18.items()},
            "args": argparse.Namespace(lr=0.1, arch="resnet18", dims=[1, 2]),
            "best_acc1": np.float64(0.5), "size": torch.Size([2, 3]),
            "device": torch.device("cpu"), "dtype": torch.float16,
            "param": torch.nn.Parameter(torch.ones(2)), "set": {1, 2}}
    for zipped in (True, False):
        path = tmp_path / f"moco_{zipped}.pth.tar"
        torch.save(ckpt, path, _use_new_zipfile_serialization=zipped)
        back = safe_load.load(str(path))
        assert back["args"] == ckpt["args"] and back["best_acc1"] == 0.5
        assert (back["size"], back["device"], back["dtype"]) == (
            ckpt["size"], ckpt["device"], ckpt["dtype"])
        assert all(torch.equal(back["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
        assert torch.equal(back["optimizer"]["state"][0]["momentum_buffer"],
                           ckpt["optimizer"]["state"][0]["momentum_buffer"])
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    back = safe_load.load(str(tmp_path / "tv.pth"))
    assert back._metadata == net.state_dict()._metadata and back.keys() == r18.keys()
    arrays = {k: v.numpy() for k, v in r18.items()}
    extra = {"s": np.float32(2), "be": np.arange(3, dtype=">f4"), "b": np.ones(2, bool),
             "i": np.int64(3)}
    for protocol in (2, 4, 5):
        with open(tmp_path / f"d2_{protocol}.pkl", "wb") as f:
            pickle.dump({"model": arrays, "__author__": "MOCO", **extra}, f, protocol=protocol)
        back = safe_load.load(str(tmp_path / f"d2_{protocol}.pkl"))
        assert all(np.array_equal(back["model"][k], v) for k, v in arrays.items())
        with open(tmp_path / f"d2_{protocol}.pkl", "rb") as f:  # what pickle itself builds
            reference = pickle.load(f, encoding="latin1")
        assert all(np.array_equal(back[k], reference[k]) and back[k].dtype == reference[k].dtype
                   for k in extra)
    (tmp_path / "py2.pkl").write_bytes(py2_pkl(np.arange(5.0)))
    back = safe_load.load(str(tmp_path / "py2.pkl"))
    np.testing.assert_array_equal(back["blobs"]["conv1_w"], np.arange(5, dtype=np.float32))
    save_file(r18, tmp_path / "w.safetensors")
    back = safe_load.load(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in r18.items())
