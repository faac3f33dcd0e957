"""Strangers' files, tried as an attacker would (issue 40): configs that run code, checkpoints
that segfault, read local files, stall, exhaust memory or hold NaN, and malformed files. Each
attack runs in a forked worker (tests/isolated.py) and must end in one line (``error: ...`` or
the loader's one-line refusal), with its marker file never created, within the seconds and
megabytes (growth of peak resident memory) the test states. The controls show each attack is
real: without the defence the payload runs, the process segfaults or the file is read.
"""
import collections
import io
import json
import os
import pickle
import shlex
import tarfile
import traceback
import zipfile

import numpy as np
import pytest
import torch
from numpy.core.multiarray import _reconstruct, scalar

from convert import safe_load
from tests.isolated import in_process, isolated

ATTACK_SECONDS, ATTACK_MB = 10, 300  # every attack below ends within these, unless it says


class Reduce:
    """Pickles as the call func(*args) (then its state): how a file names any call."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else \
            (self.func, self.args, self.state)


class Pid:
    """A torch persistent id (a storage reference), written as torch.save writes one."""

    def __init__(self, pid):
        self.pid = pid


class ZipPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Pid) else None


def torch_zip(path, obj, records, compression=zipfile.ZIP_STORED):
    """A torch.save-layout archive holding `obj` as data.pkl and `records` {key: bytes}."""
    body = io.BytesIO()
    ZipPickler(body, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", body.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return str(path)


def torch_legacy(path, obj, storage_bytes):
    """A legacy (PyTorch < 1.6) torch.save file: magic number, protocol, system info, `obj`,
    its storage key, then the storage (float32): its element count and bytes."""
    with open(path, "wb") as f:
        for part in (safe_load.LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(part, f, protocol=2)
        ZipPickler(f, protocol=2).dump(obj)
        pickle.dump(["0"], f, protocol=2)
        f.write((len(storage_bytes) // 4).to_bytes(8, "little") + storage_bytes)  # float32
    return str(path)


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return str(path)


def one_line(outcome, *fragments, seconds=ATTACK_SECONDS, megabytes=ATTACK_MB):
    """The outcome is one line holding every fragment, within the bounds."""
    assert outcome.ended == "raised", outcome
    message = outcome.value
    assert "\n" not in message.strip() and all(f in message for f in fragments), message
    assert outcome.seconds < seconds and outcome.megabytes < megabytes, outcome
    return message


def loaded(path):
    return lambda: safe_load.load(path)


def converter(*argv):
    from convert.to_detectron2 import main

    def run():
        import contextlib

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(argv))
        raise SystemExit(err.getvalue().splitlines()[0] if code else 0)
    return run


def train_net(*argv):
    from transfer.train_net import cli

    def run():
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):
            cli(["--task", "synthetic_frcnn_fpn_1k", "--dry-run", *argv])
        return "ran"
    return run


def converted_pkl(path, r18, **meta):
    """A converted .pkl (convert/to_detectron2.py's layout: model, __author__, moco_transfer)
    with one stem tensor and its metadata changed."""
    from convert.formats import RGB_TORCHVISION

    return write_pickle(path, {
        "model": {"stem.conv1.weight": r18["conv1.weight"].numpy()}, "__author__": "MOCO",
        "moco_transfer": dict({"format": "torchvision", "normalization": RGB_TORCHVISION,
                               "config": {"MODEL.RESNETS.DEPTH": 18}}, **meta)})


# ---------------------------------------------------------------- 1. code from a config
def test_task_is_a_name_never_a_path(tmp_path, marker):
    evil = tmp_path / "evil_1k.yaml"
    evil.write_text(f"MODEL:\n  DEVICE: !!python/object/apply:os.system "
                    f"['touch {shlex.quote(str(marker))}']\n")
    for task in (str(tmp_path / "evil_1k"), "../../" + str(tmp_path / "evil_1k"),
                 "../configs/synthetic_frcnn_fpn_1k", "Base-RCNN-FPN-BN"):
        one_line(isolated(train_net("--task", task), ATTACK_SECONDS, ATTACK_MB),
                 "error: unknown task", "a task is a name")
    assert not marker.exists()


def test_yaml_tags_never_run_in_a_config_or_its_bases(tmp_path, marker):
    """A saved config (load_config) whose _BASE_ chain holds a python tag is refused; the
    control: detectron2's own merge_from_file runs the same file's payload."""
    from detectron2.config import get_cfg as d2_get_cfg

    from transfer.config import load_config

    (tmp_path / "base.yaml").write_text(
        f"MODEL:\n  DEVICE: !!python/object/apply:os.system ['touch {shlex.quote(str(marker))}']\n")
    (tmp_path / "middle.yaml").write_text("_BASE_: base.yaml\n")
    (tmp_path / "run.yaml").write_text("_BASE_: middle.yaml\nSEED: 3\n")
    for name in ("base.yaml", "run.yaml"):
        one_line(isolated(lambda: load_config(str(tmp_path / name)), ATTACK_SECONDS, ATTACK_MB),
                 "ConfigError", "ConstructorError", "python/object/apply:os.system")
    assert not marker.exists()
    control = isolated(lambda: d2_get_cfg().merge_from_file(str(tmp_path / "run.yaml")),
                       ATTACK_SECONDS, ATTACK_MB)
    assert marker.exists(), control  # the attack is real: unsafe_load ran the payload


def test_config_bases_are_local_regular_files(tmp_path):
    from transfer.config import load_config

    os.mkfifo(tmp_path / "fifo.yaml")
    for base, said in (("fifo.yaml", "not a regular file"), ("/dev/zero", "not a regular file"),
                       ("http://127.0.0.1:9/x.yaml", "a URL"), ("run.yaml", "RecursionError")):
        (tmp_path / "run.yaml").write_text(f"_BASE_: {base}\n")
        one_line(isolated(lambda: load_config(str(tmp_path / "run.yaml")), 5, ATTACK_MB),
                 "ConfigError", said, seconds=5)


# ---------------------------------------------------------------- 2. segfault via dtype
# a structured dtype with an object field and its flags set to 0, given 8 bytes by scalar():
# numpy reads those bytes as an object pointer
CRAFTED = Reduce(np.dtype, ("V8", False, True),
                 (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))
# a plain spec whose state claims fields and object flags (only the state check sees it)
CRAFTED_F8 = Reduce(np.dtype, ("f8", False, True),
                    (3, "|", None, ("a",), {"a": (np.dtype("i8"), 0)}, 8, 1, 63))
SEGFAULT = Reduce(scalar, (CRAFTED, b"\x41" * 8))


@pytest.mark.parametrize("dtype", [CRAFTED, CRAFTED_F8], ids=["void", "float_with_fields"])
def test_crafted_dtype_is_refused_in_every_format_and_segfaults_when_trusted(tmp_path, r18,
                                                                             dtype):
    value = Reduce(scalar, (dtype, b"\x41" * 8))
    pth, pkl = str(tmp_path / "evil.pth"), str(tmp_path / "evil.pkl")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "best": value}, pth)
    write_pickle(pkl, {"model": {}, "__author__": "MOCO", "x": value})
    for path in (pth, pkl):
        one_line(isolated(loaded(path), ATTACK_SECONDS, ATTACK_MB), "refused to load",
                 "numpy.dtype", "--trust-checkpoint")
    meta = converted_pkl(tmp_path / "meta.pkl", r18,
                         normalization={"MODEL.PIXEL_MEAN": value})
    one_line(isolated(train_net("--weights", meta), 20, ATTACK_MB), "error:", "numpy.dtype",
             seconds=20)
    one_line(isolated(converter(pth, str(tmp_path / "out.pkl")), ATTACK_SECONDS, ATTACK_MB),
             "error:", "numpy.dtype")
    assert not (tmp_path / "out.pkl").exists()
    if dtype is CRAFTED:  # the control: unpickled in full, the file kills the process
        control = isolated(lambda: safe_load.load(pkl, trust=True), ATTACK_SECONDS, ATTACK_MB)
        assert control.ended == "crashed" and control.value == "SIGSEGV", control


# ---------------------------------------------------------------- 3. local files, stalls
def test_traceback_and_exception_types_torch_admits_are_refused(tmp_path):
    """import torch registers FrameSummary and the builtin exceptions as weights-only-safe;
    no checkpoint needs them. The control: torch's weights_only alone reads the local file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the first line of a local file\n")
    cases = {"frame": Reduce(traceback.FrameSummary, (str(secret), 1, "x")),
             "zero": Reduce(traceback.FrameSummary, ("/dev/zero", 1, "x")),
             "exception": Reduce(OSError, (2, "x")),
             "stack": Reduce(traceback.StackSummary.from_list, ([],))}
    for name, value in cases.items():
        path = str(tmp_path / f"{name}.pth")
        torch.save({"state_dict": {}, "x": value}, path)
        one_line(isolated(loaded(path), ATTACK_SECONDS, ATTACK_MB), "refused to load",
                 "--trust-checkpoint")
    control = isolated(lambda: torch.load(str(tmp_path / "frame.pth"), weights_only=True)["x"]
                       .line, ATTACK_SECONDS, ATTACK_MB)
    assert control.value == "the first line of a local file", control


def test_only_regular_files_are_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.pth")
    for path in (str(tmp_path / "fifo.pth"), "/dev/zero", str(tmp_path)):
        for read in (safe_load.load, lambda p: safe_load.load(p, trust=True)):
            one_line(isolated(lambda: read(path), 5, ATTACK_MB), "not a regular file", seconds=5)


# ---------------------------------------------------------------- 4. resource bombs
def bombs(tmp_path, r18):
    """{name: (path, what the refusal names)}: files that would allocate far beyond their
    size, each a few hundred bytes to a few MB."""
    huge = 5 * 2 ** 30
    nested = tmp_path / "nested.pkl"
    nested.write_bytes(b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b".")
    cycle = tmp_path / "cycle.pkl"
    cycle.write_bytes(b"\x80\x02]q\x00h\x00a.")
    shared = (1.0,)
    for _ in range(60):
        shared = (shared, shared)
    storage = Pid(("storage", torch.FloatStorage, "0", "cpu", 4))
    return {
        "ndarray_call": (write_pickle(tmp_path / "ndarray.pkl", {"x": Reduce(
            np.ndarray, ((huge,), np.dtype("f4")))}), "numpy.ndarray"),
        "array_shape": (write_pickle(tmp_path / "shape.pkl", {"x": Reduce(
            _reconstruct, (np.ndarray, (0,), b"b"), (1, (huge,), np.dtype("f4"), False,
                                                       b"\0" * 8))}), "bytes given 8 bytes"),
        "storage_numel": (torch_zip(tmp_path / "numel.pth", {"x": Reduce(
            torch._utils._rebuild_tensor_v2, (Pid(("storage", torch.FloatStorage, "0", "cpu",
                                                   huge)), 0, (huge,), (1,), False,
                                              collections.OrderedDict()))},
            {"0": b"\0" * 16}), "arrays of more than 1049868 bytes in a file of"),
        "stride_zero_view": (torch_zip(tmp_path / "view.pth", {"x": Reduce(
            torch._utils._rebuild_tensor_v2, (storage, 0, (2 ** 28,), (0,), False,
                                              collections.OrderedDict()))},
            {"0": b"\0" * 16}), "over a storage of 4 elements"),
        "legacy_storage": (torch_legacy(tmp_path / "legacy.pth", {"x": Reduce(
            torch._utils._rebuild_tensor_v2, (Pid(("storage", torch.FloatStorage, "0", "cpu",
                                                   huge, None)), 0, (1,), (1,), False,
                                              collections.OrderedDict()))}, b"\0" * 16),
            "in the 24 bytes that follow"),
        "zip_deflate": (torch_zip(tmp_path / "deflate.pth", {"x": 1}, {"0": bytes(64 << 20)},
                                  zipfile.ZIP_DEFLATED), "that expands to"),
        "shared_references": (converted_pkl(tmp_path / "shared.pkl", r18, normalization={
            "MODEL.PIXEL_MEAN": shared}), "once shared references are expanded"),
        "nesting": (str(nested), "nesting deeper than 64"),
        "object_count": (write_pickle(tmp_path / "count.pkl", list(range(1_000_000))),
                         "more than 500000 pickle opcodes"),
        "cycle": (str(cycle), "a cycle"),
    }


BOMB_SECONDS, BOMB_MB = 10, 200


def test_resource_bombs_are_refused_before_allocation(tmp_path, r18):
    for name, (path, said) in bombs(tmp_path, r18).items():
        message = one_line(isolated(loaded(path), BOMB_SECONDS, BOMB_MB), "refused to load",
                           said, "--trust-checkpoint", seconds=BOMB_SECONDS,
                           megabytes=BOMB_MB)
        assert os.path.getsize(path) < 5 << 20, (name, message)


def test_shared_reference_bomb_in_weights_metadata_stops_the_run_in_one_line(tmp_path, r18):
    path, said = bombs(tmp_path, r18)["shared_references"]
    one_line(isolated(train_net("--weights", path), 20, BOMB_MB), "error:", said, seconds=20,
             megabytes=BOMB_MB)


def test_bounds_are_what_refuses_the_bombs(tmp_path, r18):
    """The control: with the bounds lifted, the same scan admits the shared-reference and the
    nesting bombs (so the bounds, not something else, refuse them)."""
    from convert import pickle_scan

    lifted = pickle_scan.Rules(pickle_scan.NUMPY_CALLS, values={"numpy.ndarray"},
                               max_objects=1 << 70, max_depth=10 ** 6)
    data = open(bombs(tmp_path, r18)["shared_references"][0], "rb").read()
    lifted.max_bytes = lambda size: 1 << 70
    pickle_scan.scan_bytes(data, lifted)
    with pytest.raises(pickle_scan.OutOfBounds, match="shared references"):
        pickle_scan.scan_bytes(data, pickle_scan.PKL_RULES)


# ---------------------------------------------------------------- 5. non-finite weights
def test_nonfinite_weights_are_refused_naming_them_unless_allowed(tmp_path, r18):
    state = {f"module.encoder_q.{k}": v.clone() for k, v in r18.items()}
    state["module.encoder_q.layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["module.encoder_q.bn1.bias"][:2] = float("inf")
    path = str(tmp_path / "nan.pth.tar")
    torch.save({"arch": "resnet18", "state_dict": state}, path)
    out = str(tmp_path / "nan.pkl")
    one_line(isolated(converter(path, out), 20, 500), "error:", "2 tensor(s) hold NaN or Inf",
             "stem.conv1.norm.bias (2 values)", "res2.0.conv1.weight (1 value)",
             "--allow-nonfinite", seconds=20, megabytes=500)
    assert not os.path.exists(out)
    allowed = isolated(converter(path, out, "--allow-nonfinite"), 20, 500)
    assert allowed.value == "0" and os.path.exists(out), allowed
    one_line(isolated(train_net("--weights", out), 20, 500), "error:", "hold NaN or Inf",
             "res2.0.conv1.weight", "--allow-nonfinite", seconds=20, megabytes=500)
    ran = isolated(train_net("--weights", out, "--allow-nonfinite"), 20, 500)
    assert ran.value == "ran", ran


# ---------------------------------------------------------------- 6. malformed inputs
def malformed(tmp_path):
    """{name: (path, what the one line says)}."""
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(os.urandom(4096))
    legacy_tar = tmp_path / "legacy.pth"
    with tarfile.open(legacy_tar, "w") as t:
        for name in ("sys_info", "pickle", "tensors", "storages"):
            info = tarfile.TarInfo(name)
            info.size = 1
            t.addfile(info, io.BytesIO(b"\0"))
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    module = tmp_path / "module.pkl"
    module.write_bytes(b"\x80\x02cnonexistent_module\nThing\nq\x00)\x81q\x01.")
    cut = tmp_path / "cut.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, cut)
    cut.write_bytes(cut.read_bytes()[:3000])
    claims = tmp_path / "claims.pkl"  # a BINBYTES8 that declares 2**60 bytes
    claims.write_bytes(b"\x80\x04\x8e" + (2 ** 60).to_bytes(8, "little") + b"x.")
    return {"junk": (str(junk), "cannot be read as a checkpoint"),
            "bytes_claim": (str(claims), "cannot be read as a checkpoint"),
            "legacy_tar": (str(legacy_tar), "legacy tar checkpoint"),
            "torchscript": (str(script), "TorchScript"),
            "unknown_module": (str(module), "nonexistent_module.Thing"),
            "truncated": (str(cut), "cannot be read as a checkpoint")}


def test_malformed_checkpoints_are_one_line_everywhere(tmp_path, labeled_images):
    from convert.runtime import entry_point
    from pretrain import main_lincls, main_moco

    files = malformed(tmp_path)
    for name, (path, said) in files.items():
        trust = ("--trust-checkpoint",) if name in ("legacy_tar", "torchscript") else ()
        one_line(isolated(loaded(path), ATTACK_SECONDS, ATTACK_MB), said, *trust)
        one_line(isolated(converter(path, str(tmp_path / "out.pkl")), ATTACK_SECONDS,
                          ATTACK_MB), "error:", said)
    pkl = str(tmp_path / "junk.pkl")
    os.rename(files["junk"][0], pkl)
    one_line(isolated(train_net("--weights", pkl), 20, ATTACK_MB), "error:",
             "cannot be read as a checkpoint", seconds=20)
    resume = main_moco.get_args_parser().parse_args(
        ["--data", labeled_images, "--output", str(tmp_path / "run"), "--arch", "resnet18",
         "--batch-size", "4", "--moco-k", "8", "--image-size", "32", "--workers", "0",
         "--shuffle-groups", "2", "--precision", "fp32", "--resume", files["truncated"][0]])
    one_line(in_process(lambda: entry_point(main_moco.main, resume)), "error:",
             "cannot be read as a checkpoint", seconds=30, megabytes=500)
    lin = main_lincls.get_args_parser().parse_args(
        ["--data", labeled_images, "--pretrained", pkl, "--output", str(tmp_path / "lin"),
         "--workers", "0", "--precision", "fp32"])
    one_line(in_process(lambda: entry_point(main_lincls.main, lin)), "error:",
             "cannot be read as a checkpoint", seconds=30, megabytes=500)


def test_plain_data_of_the_wrong_shape_is_one_line(tmp_path, r18, labeled_images):
    from convert.runtime import entry_point
    from pretrain import main_lincls, main_moco

    keys = str(tmp_path / "keys.pth")
    torch.save({"state_dict": {0: torch.zeros(1), **r18}}, keys)
    one_line(isolated(converter(keys, str(tmp_path / "o.pkl")), 20, ATTACK_MB), "error:",
             "not names (e.g. 0 of type int)", seconds=20)
    listed = str(tmp_path / "list.pth.tar")
    torch.save([1, 2], listed)
    args = ["--data", labeled_images, "--output", str(tmp_path / "run"), "--arch", "resnet18",
            "--batch-size", "4", "--moco-k", "8", "--image-size", "32", "--workers", "0",
            "--shuffle-groups", "2", "--precision", "fp32"]
    resume = main_moco.get_args_parser().parse_args(args + ["--resume", listed])
    one_line(in_process(lambda: entry_point(main_moco.main, resume)), "error:",
             "not a checkpoint of pretrain.main_moco", seconds=30, megabytes=500)
    nodata = main_moco.get_args_parser().parse_args(
        ["--data", "/nonexistent"] + args[2:])
    one_line(in_process(lambda: entry_point(main_moco.main, nodata)), "error:",
             "--data /nonexistent: no such folder", seconds=30, megabytes=500)
    lin = main_lincls.get_args_parser().parse_args(
        ["--data", labeled_images, "--pretrained", listed, "--output", str(tmp_path / "lin"),
         "--workers", "0", "--precision", "fp32"])
    # lincls reads every layout the converter reads (convert.to_detectron2.read_resnet)
    one_line(in_process(lambda: entry_point(main_lincls.main, lin)), "error:",
             "expected a dict, found list", seconds=30, megabytes=500)
    meta = converted_pkl(tmp_path / "meta.pkl", r18, normalization=[1, 2])
    one_line(isolated(train_net("--weights", meta), 20, ATTACK_MB), "error:",
             "moco_transfer is not a dict holding 'normalization'", seconds=20)


def test_results_json_that_is_a_list_or_nested_deep_raises_nothing(tmp_path):
    """Nothing raises; a results.json that is not the run's record (a list, nested 200k deep)
    is an unreadable run, with the reason (results/collect.py's status table)."""
    from results.__main__ import main
    from results.collect import collect

    runs = tmp_path / "runs"
    for seed, text in ((0, "[1, 2]"), (1, "[" * 200_000 + "]" * 200_000),
                       (2, json.dumps({"state": "complete", "metrics": [1]})),
                       (3, json.dumps({"state": "complete", "metrics": {"bbox/AP": 1.0}}))):
        run = runs / "task" / "random" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(text)
    outcome = isolated(lambda: collect(str(runs))[["state", "reason"]].values.tolist(),
                       ATTACK_SECONDS, ATTACK_MB)
    states = [state for state, _ in outcome.value]
    assert states == ["unreadable", "unreadable", "failed", "complete"], outcome
    assert "holds a JSON list" in outcome.value[0][1]
    assert "nested too deep" in outcome.value[1][1]
    report = isolated(lambda: main(["--runs", str(runs), "--out", str(tmp_path / "out")]), 30,
                      500)
    assert report.ended == "returned" and report.value == 0, report
