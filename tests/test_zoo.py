"""Published checkpoints by name (convert/zoo.py), offline: every registry entry's file is
written at test time in its framework's own layout (a ResNet-18 where the layout allows; DINO's
argparse.Namespace included), served by a loopback HTTP server, and a registry override points
the real entries' layouts at it. Fetch, verify (published prefixes and recorded sha256s),
convert, cache, a transfer run and a suite by name, linear classification by name, and each bad
input's one line."""
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
import yaml

from convert import fetch, zoo
from convert.errors import UserError
from convert.to_detectron2 import convert, torchvision_to_detectron2, write_atomic
from tests.http_server import LoopbackServer
from tests.test_formats import (prefixed, r18, write_dino, write_moco,  # noqa: F401 (fixture)
                                write_vissl)

TASK = "synthetic_mask_fpn_1k"  # an R18-FPN
TRANSFER = ["SOLVER.MAX_ITER", "2", "INPUT.MIN_SIZE_TRAIN", "(56, 64)", "INPUT.MAX_SIZE_TRAIN",
            "128", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
            "TEST.PRECISE_BN.ENABLED", "False"]


# ---------------------------------------------------------------- the registry's layouts
def write_swav_hub(sd, path):
    """The published SwAV / DeepCluster-v2 / SeLa-v2 file: a bare state dict with DDP's
    ``module.`` (swav's hubconf.py loads it so and strips ``module.``), heads included."""
    torch.save(prefixed("module.", {**{k: v for k, v in sd.items() if not k.startswith("fc.")},
                                    "projection_head.0.weight": torch.randn(8, 512),
                                    "prototypes.weight": torch.randn(16, 8)}), path)


def write_mmselfsup(sd, path):
    """mmselfsup's published checkpoint (publish_model.py drops the optimizer): meta, and the
    model's state dict with backbone., neck. and the momentum encoder."""
    torch.save({"meta": {"epoch": 200, "mmcv_version": "1.4.0", "time": "Fri Feb 25 2022",
                         "config": "model = dict(type='DenseCL')"},
                "state_dict": {**prefixed("backbone.", {k: v for k, v in sd.items()
                                                       if not k.startswith("fc.")}),
                               "neck.mlp.0.weight": torch.randn(8, 512),
                               **prefixed("encoder_k.0.", sd)}}, path)


def write_torchvision(sd, path):
    torch.save(sd, path)


def write_caffe2(sd, path):
    """MSRA's R-50.pkl as Detectron (Caffe2) pickled it: blob name -> float32 array."""
    blobs = {"conv1_w": sd["conv1.weight"].numpy(), "res_conv1_bn_s": np.ones(64, np.float32),
             "res_conv1_bn_b": np.zeros(64, np.float32),
             "res2_0_branch2a_w": sd["layer1.0.conv1.weight"].numpy(),
             "conv1_w_momentum": np.zeros((64, 3, 7, 7), np.float32)}
    with open(path, "wb") as f:
        pickle.dump(blobs, f)


WRITERS = {"moco_v1_200ep": write_moco, "moco_v2_200ep": write_moco,
           "moco_v2_800ep": write_moco, "swav_800ep": write_swav_hub,
           "deepclusterv2_800ep": write_swav_hub, "selav2_400ep": write_swav_hub,
           "vissl_moco_v2_200ep": write_vissl, "dino_resnet50": write_dino,
           "densecl_200ep_mmselfsup": write_mmselfsup, "torchvision_resnet50": write_torchvision,
           "msra_r50": write_caffe2}


def real_registry():
    with open(zoo.REGISTRY_FILE) as f:
        return yaml.safe_load(f)


def test_every_registry_entry_has_a_test_layout_and_cites_its_sources():
    raw = real_registry()
    assert set(raw) == set(WRITERS)
    for name, e in raw.items():
        assert e["url_source"] and e["checksum_source"] and e["licence"], name
        assert all(u.startswith("https://") for u in e["urls"]), name
        if e["checksum"]:  # a prefix published in the file's name is that name's suffix
            kind, value = next(iter(e["checksum"].items()))
            assert len(value) == 8 and int(value, 16) >= 0, name
    # the MoCo README's md5 prefixes
    assert {n: raw[n]["checksum"] for n in ("moco_v1_200ep", "moco_v2_200ep", "moco_v2_800ep")} \
        == {"moco_v1_200ep": {"md5_prefix": "b251726a"},
            "moco_v2_200ep": {"md5_prefix": "59fd9945"},
            "moco_v2_800ep": {"md5_prefix": "a04e12f8"}}
    assert "supervised" in raw["msra_r50"]["aliases"]


@pytest.fixture(scope="module")
def served(r18, tmp_path_factory):  # noqa: F811
    """Every entry's file in a folder, its digests, and a loopback server over the folder."""
    folder = tmp_path_factory.mktemp("published")
    digests = {}
    for name, e in real_registry().items():
        path = str(folder / e["filename"])
        WRITERS[name](r18, path)
        data = open(path, "rb").read()
        digests[name] = {"md5": hashlib.md5(data).hexdigest(),
                         "sha256": hashlib.sha256(data).hexdigest()}
    with LoopbackServer(folder=str(folder)) as server:
        yield server, str(folder), digests


def registry_override(path, server, digests, **changes):
    """The real registry, its URLs pointing at `server`, its published prefixes those of the
    generated files, the arch the ResNet-18 the tests write; `changes`: name -> fields."""
    raw = real_registry()
    for name, e in raw.items():
        e["urls"] = [server.url(e["filename"])]
        e["arch"] = "resnet18"
        if e["checksum"]:
            kind, _ = next(iter(e["checksum"].items()))
            e["checksum"] = {kind: digests[name][kind.split("_")[0]][:8]}
        e.update(changes.get(name, {}))
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return str(path)


def options(tmp_path, server, digests, **kw):
    changes = kw.pop("changes", {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    registry = registry_override(tmp_path / "zoo.yaml", server, digests, **changes)
    return zoo.ZooOptions(cache_dir=str(tmp_path / "cache"), registry=registry, progress=False,
                          **kw)


# ---------------------------------------------------------------- fetch, verify, convert
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_entry_is_fetched_verified_converted_and_cached(served, r18, tmp_path,  # noqa: F811
                                                             name):
    server, folder, digests = served
    opts = options(tmp_path, server, digests)
    before = len(server.log)
    got = zoo.resolve(name, opts)
    assert len(server.requests_for(got.entry.filename)) >= 1
    assert got.source_sha256 == digests[name]["sha256"]
    assert got.checksum_kind == ("published" if got.entry.checksum else "recorded")
    with open(got.pkl, "rb") as f:
        out = pickle.load(f)
    record = out["moco_transfer"]["zoo"]
    assert record["name"] == name and record["url"] == server.url(got.entry.filename)
    assert record["source_sha256"] == digests[name]["sha256"]
    if name == "msra_r50":  # Caffe2 blobs, passed through for detectron2's own renaming
        assert out["__author__"] == "Caffe2" and "conv1_w_momentum" not in out["model"]
        np.testing.assert_array_equal(out["model"]["res2_0_branch2a_w"],
                                      r18["layer1.0.conv1.weight"].numpy())
        assert out["moco_transfer"]["normalization"]["INPUT.FORMAT"] == "BGR"
    else:  # the encoder the method evaluates, every tensor
        assert out["moco_transfer"]["arch"] == "resnet18"
        for key, value in r18.items():
            if not key.startswith("fc."):
                np.testing.assert_array_equal(out["model"][torchvision_to_detectron2(key)],
                                              value.numpy(), err_msg=key)
    # cached: no request at all the second time, the same .pkl
    mtime, requests = os.path.getmtime(got.pkl), len(server.log)
    again = zoo.resolve(name, opts)
    assert len(server.log) == requests and os.path.getmtime(again.pkl) == mtime
    assert requests > before


def test_make_zoo_lists_checksum_kind_and_cached(served, tmp_path, capsys):
    server, _, digests = served
    opts = options(tmp_path, server, digests)
    zoo.resolve("swav_800ep", opts)
    assert zoo.main(["--zoo-registry", opts.registry, "--zoo-cache", opts.cache]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(WRITERS) <= set(lines)
    assert " recorded " in lines["swav_800ep"] and " yes " in lines["swav_800ep"]
    assert " published md5_prefix " in lines["moco_v2_800ep"] and " no " in lines["moco_v2_800ep"]


def test_concurrent_users_of_one_name_fetch_and_convert_it_once(served, tmp_path,
                                                                monkeypatch):
    """Runs of a suite (JOBS=N) or ranks asking for the same name at once: one download, one
    conversion (a slow conversion leaves the others time to go past the download's own lock)."""
    import threading
    import time

    _, folder, digests = served
    conversions = []
    convert_entry = zoo.convert_entry

    def slow_convert(*args, **kwargs):
        conversions.append(1)
        time.sleep(0.5)
        return convert_entry(*args, **kwargs)

    monkeypatch.setattr(zoo, "convert_entry", slow_convert)
    results = []
    with LoopbackServer(folder=folder, delay=0.001) as server:
        opts = options(tmp_path, server, digests)
        threads = [threading.Thread(
            target=lambda: results.append(zoo.resolve("torchvision_resnet50", opts)))
            for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 3 and len({r.pkl for r in results}) == 1
    assert len(server.requests_for("resnet50-0676ba61.pth")) == 1 and len(conversions) == 1


# ---------------------------------------------------------------- bad input, one line each
def test_published_prefix_mismatch_refuses_and_removes_the_file(served, tmp_path):
    server, _, digests = served
    opts = options(tmp_path, server, digests,
                   changes={"moco_v2_800ep": {"checksum": {"md5_prefix": "a04e12f8"}}})
    with pytest.raises(UserError) as e:
        zoo.resolve("moco_v2_800ep", opts)
    msg = str(e.value)
    assert "\n" not in msg and "not the published md5_prefix a04e12f8" in msg and "removed" in msg
    assert digests["moco_v2_800ep"]["md5"] in msg
    entry_dir = os.path.join(opts.cache, "moco_v2_800ep")
    assert sorted(f for f in os.listdir(entry_dir) if not f.endswith(".lock")) == []
    # the right prefix afterwards: fetched again from scratch, accepted
    fixed = options(tmp_path, server, digests)
    assert zoo.resolve("moco_v2_800ep", fixed).source_sha256 == digests["moco_v2_800ep"]["sha256"]


def test_recorded_sha256_of_a_changed_cache_file_is_refused(served, tmp_path):
    server, _, digests = served
    opts = options(tmp_path, server, digests)
    got = zoo.resolve("dino_resnet50", opts)
    with open(got.source, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 8)
    with pytest.raises(UserError, match="has changed since it was downloaded"):
        zoo.resolve("dino_resnet50", opts)


def test_unknown_name_lists_the_known_ones_with_the_nearest(served, tmp_path):
    from transfer.weights import parse_weights, read_spec

    server, _, digests = served
    opts = options(tmp_path, server, digests)
    with pytest.raises(UserError) as e:
        parse_weights("moco_v2_80ep", opts.registry)
    assert "did you mean 'moco_v2_800ep'?" in str(e.value) and "swav_800ep" in str(e.value)
    # a file wins over a name; label=name; a path-like token is a (missing) file
    path = tmp_path / "moco_v2_800ep"
    path.write_bytes(b"x")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        registry = zoo.load_registry(opts.registry)
        spec = read_spec("moco_v2_800ep", registry)  # the file, not the name
        assert (spec.label, spec.path, spec.entry) == ("moco_v2_800ep", "moco_v2_800ep", None)
        assert read_spec("x=moco_v2_800ep", registry).entry is None
        assert read_spec("swav_800ep", registry).entry.name == "swav_800ep"
        assert parse_weights("mine=swav_800ep", opts.registry) == ("mine", "swav_800ep")
        assert parse_weights("supervised", opts.registry) == ("supervised", "msra_r50")
        assert parse_weights("nope/x.pkl", opts.registry) == ("x", "nope/x.pkl")
    finally:
        os.chdir(old)


def test_dead_link_tries_the_mirrors_then_names_every_url(served, tmp_path):
    server, folder, digests = served
    name = "selav2_400ep"
    filename = real_registry()[name]["filename"]
    server.status["/gone/" + filename] = 404
    opts = options(tmp_path, server, digests,
                   changes={name: {"urls": [server.url("gone/" + filename)]}},
                   mirrors=(server.url("nothing-here"),))
    with pytest.raises(UserError) as e:
        zoo.resolve(name, opts)
    msg = str(e.value)
    assert "\n" not in msg
    assert server.url("gone/" + filename) in msg and server.url("nothing-here/" + filename) in msg
    assert "mirror" in msg.lower()
    # a mirror folder holding the file supplies it
    good = zoo.ZooOptions(opts.cache_dir, (folder,), registry=opts.registry, progress=False)
    assert zoo.resolve(name, good).source_sha256 == digests[name]["sha256"]


def test_cut_download_is_resumed_with_a_range_request(served, tmp_path):
    server, _, digests = served
    name = "deepclusterv2_800ep"
    filename = real_registry()[name]["filename"]
    opts = options(tmp_path, server, digests)
    server.cut[filename] = 300_000
    got = zoo.resolve(name, opts)
    ranges = [r.range for r in server.requests_for(filename)[-2:]]
    assert ranges == ["", "bytes=300000-"]
    assert got.source_sha256 == digests[name]["sha256"]


def test_offline_uses_the_cache_and_names_what_it_would_fetch(served, tmp_path):
    _, folder, digests = served
    with LoopbackServer(folder=folder) as own:
        opts = options(tmp_path, own, digests)
        first = zoo.resolve("moco_v1_200ep", opts)
    assert len(own.log) == 1  # stopped from here on: any request would fail
    for offline in (False, True):  # a cached name needs no request, --offline or not
        again = zoo.ZooOptions(opts.cache_dir, registry=opts.registry, offline=offline,
                               progress=False)
        assert zoo.resolve("moco_v1_200ep", again).pkl == first.pkl
    # not cached, offline, the server up: no request, one line saying what it would fetch
    server, _, _ = served
    offline = options(tmp_path / "up", server, digests, offline=True)
    count = len(server.log)
    with pytest.raises(UserError) as e:
        zoo.resolve("moco_v2_200ep", offline)
    msg = str(e.value)
    assert "\n" not in msg and server.url("moco_v2_200ep_pretrain.pth.tar") in msg
    assert "MIRROR=" in msg and len(server.log) == count
    # a mirror folder, offline
    mirrored = zoo.ZooOptions(offline.cache_dir, (folder,), registry=offline.registry,
                              offline=True, progress=False)
    assert zoo.resolve("moco_v2_200ep", mirrored).source_sha256 == \
        digests["moco_v2_200ep"]["sha256"]
    assert len(server.log) == count and len(own.log) == 1


def test_offline_transfer_by_name_says_in_one_line_what_it_would_fetch(served, tmp_path):
    from convert.runtime import entry_point
    from transfer.train_net import execute, parse_args

    server, _, digests = served
    opts = options(tmp_path, server, digests)
    count = len(server.log)
    args = parse_args(["--task", TASK, "--weights", "moco_v2_800ep", "--runs",
                       str(tmp_path / "runs"), "--zoo-registry", opts.registry, "--zoo-cache",
                       opts.cache, "--offline"])
    with pytest.raises(SystemExit) as e:  # what the program prints on stderr, and exits 1
        entry_point(execute, args)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: weights 'moco_v2_800ep': ")
    assert "moco_v2_800ep_pretrain.pth.tar" in msg and "MIRROR=" in msg
    assert len(server.log) == count and not os.path.exists(tmp_path / "runs")


# ---------------------------------------------------------------- runs by name
@pytest.fixture
def synthetic_datasets(tmp_path, monkeypatch):
    from pretrain import synthetic

    synthetic.generate(str(tmp_path / "datasets" / "synthetic"), n_unlabeled=0,
                       n_labeled_per_class=0, n_train=4, n_val=2, quiet=True)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))


def test_suite_mixes_names_paths_and_baselines_and_a_smoke_run_by_name_records_its_source(
        served, r18, tmp_path, synthetic_datasets, capsys):  # noqa: F811
    from results.collect import collect
    from results.tables import build_tables
    from tools.suite import main as suite_main

    server, _, digests = served
    opts = options(tmp_path, server, digests)
    flags = ["--zoo-registry", opts.registry, "--zoo-cache", opts.cache]
    mine = tmp_path / "mine.pth.tar"
    write_moco(r18, str(mine))
    write_atomic(convert(str(mine))[0], str(tmp_path / "mine.pkl"))
    runs = tmp_path / "runs"
    weights = (f"moco_v2_800ep ours={tmp_path / 'mine.pkl'} supervised random "
               "tv=torchvision_resnet50")
    requests = len(server.log)
    assert suite_main(["--tasks", TASK, "--weights", weights, "--scale", "smoke", "--runs",
                       str(runs), "--dry-run", *flags]) == 0
    plan = capsys.readouterr().out
    for label in ("moco_v2_800ep", "ours", "supervised", "random", "tv"):
        assert f" {label} " in plan
    assert len(server.log) == requests  # a dry run fetches nothing

    assert suite_main(["--tasks", TASK, "--weights", "moco_v2_800ep", "--scale", "smoke",
                       "--runs", str(runs), *flags, "--verbose", *TRANSFER]) == 0
    assert len(server.log) == requests + 1  # fetched once, by the suite; the run used the cache
    with open(runs / f"{TASK}@smoke" / "moco_v2_800ep" / "seed0" / "results.json") as f:
        res = json.load(f)
    assert res["state"] == "complete" and "bbox/AP" in res["metrics"]
    assert res["weights_source"] == {"name": "moco_v2_800ep",
                                     "url": server.url("moco_v2_800ep_pretrain.pth.tar"),
                                     "sha256": digests["moco_v2_800ep"]["sha256"]}
    assert res["weights_file"] == os.path.join(opts.cache, "moco_v2_800ep", "moco_v2_800ep.pkl")
    # the table's footnote names the published checkpoint
    table, = build_tables(collect(str(runs)))
    assert (f"Weights 'moco_v2_800ep': published checkpoint moco_v2_800ep, "
            f"{server.url('moco_v2_800ep_pretrain.pth.tar')}, source sha256 "
            f"{digests['moco_v2_800ep']['sha256']}") in table.notes()


def test_linear_classification_by_name_reads_the_layout_the_method_evaluates(
        served, r18, tmp_path, labeled_images):  # noqa: F811
    from pretrain import main_lincls

    server, _, digests = served
    opts = options(tmp_path, server, digests)
    args = main_lincls.get_args_parser().parse_args(
        ["--data", labeled_images, "--pretrained", "dino_resnet50", "--output",
         str(tmp_path / "lin"), "--epochs", "1", "--batch-size", "8", "--image-size", "32",
         "--workers", "0", "--precision", "fp32", "--zoo-registry", opts.registry,
         "--zoo-cache", opts.cache])
    main_lincls.main(args)
    lin = torch.load(tmp_path / "lin" / "checkpoint_last.pth.tar", weights_only=True)
    for key, value in r18.items():  # DINO's teacher (the student was written shifted by 1)
        if not key.startswith("fc."):
            torch.testing.assert_close(lin["state_dict"]["module." + key], value)
    recorded = fetch.read_manifest(os.path.join(opts.cache, "dino_resnet50"))
    assert recorded["dino_resnet50_pretrain_full_checkpoint.pth"]["sha256"] == \
        digests["dino_resnet50"]["sha256"]
