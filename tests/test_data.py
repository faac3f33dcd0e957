"""`make data` end to end against a loopback server serving generated archives with the official
names and layouts (tests/data_archives.py), with a recipe override in the real schema: download,
verify, convert, count, record; the exact outputs of each conversion; a cut resumed, a checksum
mismatch, a 404 then a mirror, two runs at once, the cluster path, bad input."""
import json
import os
import shutil
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, SHARED_DATA, requires_shared
from tests.data_archives import DENSEPOSE_FILES, override, write_all
from tests.http_server import LoopbackServer
from tools.data.build import entry as main
from tools.data.recipes import MANIFEST

pytestmark = requires_shared
USER, PASSWORD = "ada", "s3cret"
CITYSCAPES_IDS = {"gtFine_trainvaltest.zip": 1, "leftImg8bit_trainvaltest.zip": 3}


def cityscapes_site(server, archives):
    """The Cityscapes site's endpoints (cityscapesscripts' downloader's), behind a login."""
    def logged_in(handler):
        return "session=ok" in handler.headers.get("Cookie", "")

    def login(handler, method):
        if method == "GET":
            server.reply(handler, method, 200, b"<form>login</form>")
            return True
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0))).decode()
        form = urllib.parse.parse_qs(body)
        if form.get("username") == [USER] and form.get("password") == [PASSWORD]:
            server.reply(handler, method, 302, b"", [("Set-Cookie", "session=ok; Path=/"),
                                                     ("Location", "/")])
        else:
            server.reply(handler, method, 200, b"<form>wrong password</form>")
        return True

    def package(handler):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(handler.path).query)
        pid = int(query["packageID"][0])
        return next(n for n, i in CITYSCAPES_IDS.items() if i == pid)

    def listing(handler, method):
        if not logged_in(handler):
            server.reply(handler, method, 302, b"", [("Location", "/login")])
            return True
        server.reply(handler, method, 200, json.dumps(
            [{"name": n, "packageID": i, "size": "1 MB", "thirdparty": "0"}
             for n, i in CITYSCAPES_IDS.items()]).encode())
        return True

    def md5(handler, method):
        from tests.data_archives import md5_of
        name = package(handler)
        server.reply(handler, method, 200, f"{md5_of(os.path.join(archives, name))}  "
                                           f"{name}".encode())
        return True

    def file_handling(handler, method):
        if not logged_in(handler):
            server.reply(handler, method, 302, b"", [("Location", "/login")])
            return True
        name = package(handler)
        with open(os.path.join(archives, name), "rb") as f:
            server.serve_bytes(handler, method, name, f.read())
        return True

    server.routes.update({"/login": login, "/downloads/": listing, "/md5-sum/": md5,
                          "/file-handling/": file_handling})


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """The generated archives, their expected counts, the server and the recipe override.
    The server serves <base>/official/<name> (the recipe's URLs) and <base>/mirror/<name>."""
    base = tmp_path_factory.mktemp("data_archives")
    archives = str(base / "official")
    counts, details = write_all(SHARED_DATA, archives, str(base / "work"))
    os.symlink(archives, base / "mirror")
    with LoopbackServer(folder=str(base)) as server:
        cityscapes_site(server, archives)
        recipes = str(base / "recipes.json")
        with open(recipes, "w") as f:
            json.dump(override(archives, server.url("official"), counts, site=server.base), f)
        yield {"archives": archives, "counts": counts, "details": details, "server": server,
               "recipes": recipes, "base": base}


@pytest.fixture
def server(gen):
    s = gen["server"]
    s.log.clear()
    s.cut.clear()
    s.status.clear()
    return s


def make_data(gen, dataset, root, *extra):
    return main([dataset, "--root", str(root), "--recipes", gen["recipes"], "--no-progress",
                 *extra])


def manifest(root):
    with open(os.path.join(root, MANIFEST)) as f:
        return json.load(f)


def official(name):
    return "/official/" + name


def downloads(server):
    return sorted(r.path for r in server.log if r.method == "GET" and r.status in (200, 206))


# ---------------------------------------------------------------- VOC: detection + segmentation
def test_voc_from_nothing_then_a_no_op_then_verify(gen, server, tmp_path, capsys):
    root = tmp_path / "datasets"
    server.cut["official/VOCtrainval_11-May-2012.tar"] = 400_000   # resumed with a Range
    assert make_data(gen, "voc", root) == 0
    out = capsys.readouterr().out
    assert "VOCtrainval_06-Nov-2007.tar: published md5 (generated by tests/data_archives.py)" \
        in out
    # the cut download was resumed: the retry asked for the rest and got only the rest
    tries = [r for r in server.log if r.path == official("VOCtrainval_11-May-2012.tar")]
    size = os.path.getsize(os.path.join(gen["archives"], "VOCtrainval_11-May-2012.tar"))
    assert [(r.range, r.status, r.sent) for r in tries] == [
        ("", 200, 400_000), ("bytes=400000-", 206, size - 400_000)]
    m = manifest(root)
    for name in ("voc2007", "voc2012", "voc_sbd"):
        assert m[name]["counts"] == gen["counts"][name]
    # SBD -> SegmentationClassAug: VOC's own labels where VOC has one, SBD's GTcls elsewhere
    voc = gen["details"]["voc"]
    with open(root / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt") as f:
        assert f.read().split() == voc["train_aug"]
    for i, label in voc["labels"].items():
        png = Image.open(root / "VOC2012" / "SegmentationClassAug" / f"{i}.png")
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), label)
    assert sorted(os.listdir(root / "VOC2012" / "SegmentationClassAug")) == \
        sorted(f"{i}.png" for i in voc["labels"])
    assert not os.path.exists(root / ".staging" / "voc_sbd")
    # a finished dataset is a no-op: no request, nothing rewritten
    server.log.clear()
    assert make_data(gen, "voc", root) == 0
    assert capsys.readouterr().out.count(": ready (built ") == 3
    assert server.log == []
    # VERIFY=1 recounts; a label removed behind its back is found
    os.remove(root / "VOC2012" / "SegmentationClassAug" / f"{voc['val'][0]}.png")
    assert make_data(gen, "voc_sbd", root, "--verify") == 2
    assert "1 SegmentationClassAug labels missing" in capsys.readouterr().err


def test_voc_segmentation_trains_on_the_built_root(gen, server, tmp_path):
    """The produced root is what the harness reads: a smoke run of the VOC segmentation task
    (and the detection datasets register and load)."""
    root = tmp_path / "datasets"
    assert make_data(gen, "voc", root) == 0
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "transfer.train_net", "--task",
                          "voc_semseg_fcn_30k", "--weights", "random", "--scale", "smoke",
                          "--runs", str(tmp_path / "runs"), "SOLVER.MAX_ITER", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs" / "voc_semseg_fcn_30k@smoke" / "random" / "seed0"
    with open(out / "results.json") as f:
        res = json.load(f)
    assert res["state"] == "complete" and "sem_seg/mIoU" in res["metrics"]
    # make doctor reads the manifest: the VOC tasks ready, the others with the command to run
    doctor = subprocess.run([sys.executable, "-m", "tools.doctor"], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    lines = {line.split()[0]: " ".join(line.split()) for line in doctor.stdout.splitlines()
             if line.startswith("  ") and line.split()}
    for task in ("voc07_frcnn_c4_9k", "voc_frcnn_c4_24k", "voc_frcnn_dc5_24k",
                 "voc_semseg_fcn_30k"):
        assert lines[task] == f"{task} ready"
    assert lines["coco_mask_fpn_1x"].endswith(f"; run: make data DATASET=coco ROOT={root}")
    assert lines["voc_sbd"].startswith("voc_sbd built ") and \
        lines["voc_sbd"].endswith("train_aug images 9, val images 2")


# ---------------------------------------------------------------- COCO, LVIS, DensePose
def test_coco_lvis_densepose(gen, server, tmp_path):
    root = tmp_path / "datasets"
    for name in ("coco", "lvis", "densepose"):
        assert make_data(gen, name, root) == 0
    m = manifest(root)
    for name in ("coco", "lvis_v0.5", "lvis_v1", "coco2014", "densepose"):
        assert m[name]["counts"] == gen["counts"][name], name
    coco = root / "coco"
    assert sorted(os.listdir(coco / "annotations")) == sorted(
        [f"{k}_{s}2017.json" for k in ("instances", "person_keypoints") for s in ("train", "val")]
        + [n for n in DENSEPOSE_FILES if n.endswith(".json")])
    for name in DENSEPOSE_FILES:
        dest = coco / "annotations" / name if name.endswith(".json") else \
            root / "densepose" / name
        with open(dest, "rb") as a, open(os.path.join(gen["archives"], name), "rb") as b:
            assert a.read() == b.read()
    assert sorted(os.listdir(root / "lvis")) == ["lvis_v0.5_train.json", "lvis_v0.5_val.json",
                                                  "lvis_v1_train.json", "lvis_v1_val.json"]
    # recorded sha256 for COCO (nobody publishes one), checked at the next use
    assert m["coco"]["files"]["train2017.zip"]["checksum"] == "recorded sha256 (first download)"
    # LVIS on a fresh root builds COCO first (its images)
    assert make_data(gen, "lvis_v1", tmp_path / "fresh") == 0
    assert set(manifest(tmp_path / "fresh")) == {"coco", "lvis_v1"}


def test_lvis_needs_coco_first(gen, server, tmp_path, capsys):
    from tools.data.build import build_one, parse_args
    from tools.data.recipes import load_recipes
    from convert.errors import UserError
    recipes = load_recipes(gen["recipes"])
    args = parse_args(["lvis_v1", "--no-progress"])
    with pytest.raises(UserError) as e:
        build_one("lvis_v1", recipes["datasets"]["lvis_v1"], args, str(tmp_path),
                  str(tmp_path / "archives"))
    assert str(e.value) == f"lvis_v1 needs coco: make data DATASET=coco ROOT={tmp_path}"


# ---------------------------------------------------------------- Cityscapes
def test_cityscapes_with_credentials_then_train_ids(gen, server, tmp_path, capsys):
    root = tmp_path / "datasets"
    creds = tmp_path / "cityscapes.json"
    # no credentials, no zips: says how to give them, without a prompt
    assert make_data(gen, "cityscapes", root) == 2
    assert "CREDENTIALS=<json file>" in capsys.readouterr().err
    creds.write_text(json.dumps({"username": USER, "password": "wrong"}))
    assert make_data(gen, "cityscapes", root, "--credentials", str(creds)) == 2
    assert "refused the credentials of user 'ada'" in capsys.readouterr().err
    creds.write_text(json.dumps({"username": USER, "password": PASSWORD}))
    assert make_data(gen, "cityscapes", root, "--credentials", str(creds)) == 0
    assert "gtFine_trainvaltest.zip: published md5 (the Cityscapes site's" in \
        capsys.readouterr().out
    assert manifest(root)["cityscapes"]["counts"] == gen["counts"]["cityscapes"]
    # or from the zips the user already has: no login, no request
    server.log.clear()
    assert make_data(gen, "cityscapes", tmp_path / "other", "--mirror", gen["archives"]) == 0
    assert server.log == []
    assert manifest(tmp_path / "other")["cityscapes"]["counts"] == gen["counts"]["cityscapes"]
    # the trainId images are cityscapesscripts' json2labelImg's; the fixture drew the same
    fixture = gen["details"]["cityscapes"]["root"]
    made = sorted(os.path.relpath(os.path.join(d, f), root / "cityscapes")
                  for d, _, fs in os.walk(root / "cityscapes") for f in fs
                  if f.endswith("_labelTrainIds.png"))
    assert len(made) == 4   # train 2, val 1, test 1
    for rel in made:
        if "/test/" in rel:
            continue
        np.testing.assert_array_equal(np.asarray(Image.open(root / "cityscapes" / rel)),
                                      np.asarray(Image.open(os.path.join(fixture, rel))))


# ---------------------------------------------------------------- ImageNet
def test_imagenet_from_the_official_tars(gen, server, tmp_path, capsys):
    root = tmp_path / "datasets"
    assert make_data(gen, "imagenet", root) == 2
    assert "ImageNet cannot be downloaded by a program" in capsys.readouterr().err
    assert make_data(gen, "imagenet", root, "--imagenet", gen["archives"]) == 0
    assert manifest(root)["imagenet"]["counts"] == gen["counts"]["imagenet"]
    val = root / "imagenet" / "val"
    got = {f: w for w in os.listdir(val) for f in os.listdir(val / w)}
    classes = gen["details"]["imagenet"]["val_classes"]
    assert got == {f"ILSVRC2012_val_{k + 1:08d}.JPEG": w for k, w in enumerate(classes)}
    assert server.log == []   # the user's tars, used in place
    # a folder whose tars are not the official ones: one line, nothing built
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in os.listdir(gen["archives"]):
        if name.startswith("ILSVRC"):
            shutil.copy(os.path.join(gen["archives"], name), wrong / name)
    (wrong / "ILSVRC2012_img_val.tar").write_bytes(b"not a tar")
    assert make_data(gen, "imagenet", tmp_path / "other", "--imagenet", str(wrong)) == 2
    err = capsys.readouterr().err
    assert "ILSVRC2012_img_val.tar" in err and "is not the published" in err
    assert not (tmp_path / "other" / "imagenet").exists()


def test_imagenet_pretrains_on_the_built_folder(gen, server, tmp_path):
    root = tmp_path / "datasets"
    assert make_data(gen, "imagenet", root, "--imagenet", gen["archives"]) == 0
    res = subprocess.run([sys.executable, "-m", "pretrain.main_moco", "--data",
                          str(root / "imagenet" / "train"), "--output", str(tmp_path / "out"),
                          "--epochs", "1", "--batch-size", "2", "--shuffle-groups", "2",
                          "--moco-k", "4", "--image-size", "64", "--arch", "resnet18",
                          "--max-iters", "2", "--workers", "0"],
                         capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    saved = [f for _, _, fs in os.walk(tmp_path / "out") for f in fs if ".pth" in f]
    assert saved, os.listdir(tmp_path / "out")


# ---------------------------------------------------------------- failures, mirrors, clusters
def test_checksum_mismatch_leaves_nothing(gen, server, tmp_path, capsys):
    with open(gen["recipes"]) as f:
        recipes = json.load(f)
    recipes["datasets"]["voc2007"]["files"][0]["md5"] = "0" * 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recipes))
    root = tmp_path / "datasets"
    assert main(["voc2007", "--root", str(root), "--recipes", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the published " + "0" * 32 in err
    assert not os.path.exists(root / "VOC2007")
    assert [f for f in os.listdir(root / "archives") if f.endswith((".tar", ".part"))] == []


def test_counts_that_are_not_the_official_ones_are_refused(gen, server, tmp_path, capsys):
    with open(gen["recipes"]) as f:
        recipes = json.load(f)
    recipes["datasets"]["voc2007"]["counts"]["VOC2007 test images"] = 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recipes))
    root = tmp_path / "datasets"
    assert main(["voc2007", "--root", str(root), "--recipes", str(bad), "--no-progress"]) == 2
    assert "VOC2007 test images: 2 (official 3)" in capsys.readouterr().err
    assert not os.path.exists(root / MANIFEST) or "voc2007" not in manifest(root)


def test_404_then_the_mirror(gen, server, tmp_path):
    server.status[official("VOCtest_06-Nov-2007.tar")] = 404
    server.status[official("VOCtrainval_06-Nov-2007.tar")] = 404
    root = tmp_path / "datasets"
    assert make_data(gen, "voc2007", root, "--mirror", server.url("gone"),
                     "--mirror", server.url("mirror")) == 0
    assert downloads(server) == ["/mirror/VOCtest_06-Nov-2007.tar",
                                 "/mirror/VOCtrainval_06-Nov-2007.tar"]
    assert manifest(root)["voc2007"]["files"]["VOCtest_06-Nov-2007.tar"]["source"] == \
        server.url("mirror/VOCtest_06-Nov-2007.tar")


def test_two_runs_at_once_wait_for_each_other(gen, server, tmp_path):
    root = tmp_path / "datasets"
    server.delay = 0.01
    try:
        cmd = [sys.executable, "-m", "tools.data", "voc2007", "--root", str(root), "--recipes",
               gen["recipes"], "--no-progress"]
        env = dict(os.environ, PYTHONPATH=ROOT)
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        server.delay = 0
    assert [p.returncode for p in procs] == [0, 0], outs
    stdout = "".join(o for o, _ in outs)
    assert stdout.count("voc2007: built in") == 1 and stdout.count("voc2007: ready") == 1
    assert downloads(server) == [official("VOCtest_06-Nov-2007.tar"),
                                 official("VOCtrainval_06-Nov-2007.tar")]


def test_cluster_path_fetch_only_then_build_offline_from_the_cache(gen, tmp_path, capsys):
    """A login node fetches; the server goes away; a node without network builds from the
    cache given as the mirror. KEEP_ARCHIVES=0 deletes the node's own copies only."""
    cache = tmp_path / "cache"
    with LoopbackServer(folder=str(gen["base"])) as login_node:
        with open(gen["recipes"]) as f:
            text = f.read().replace(gen["server"].base, login_node.base)
        recipes = tmp_path / "recipes.json"
        recipes.write_text(text)
        assert main(["voc", "--root", str(tmp_path / "login_root"), "--cache", str(cache),
                     "--fetch-only", "--recipes", str(recipes), "--no-progress"]) == 0
        assert f"make data DATASET=voc MIRROR={cache}" in capsys.readouterr().out
        assert not os.path.exists(tmp_path / "login_root" / MANIFEST)
    # the server is stopped: any request would fail
    root = tmp_path / "node"
    assert main(["voc", "--root", str(root), "--mirror", str(cache), "--offline",
                 "--keep-archives", "0", "--recipes", str(recipes), "--no-progress"]) == 0
    assert set(manifest(root)) == {"voc2007", "voc2012", "voc_sbd"}
    assert sorted(f for f in os.listdir(cache) if f.endswith((".tar", ".tgz"))) == [
        "VOCtest_06-Nov-2007.tar", "VOCtrainval_06-Nov-2007.tar", "VOCtrainval_11-May-2012.tar",
        "benchmark.tgz"]   # the mirror's files are kept
    # offline with nothing anywhere: one line that says what it would fetch and how to supply it
    assert main(["voc2007", "--root", str(tmp_path / "empty"), "--offline", "--recipes",
                 str(recipes), "--no-progress"]) == 2
    assert "copy VOCtrainval_06-Nov-2007.tar into a folder and give that folder as a mirror" \
        in capsys.readouterr().err


def test_keep_archives_0_deletes_the_cached_archives(gen, server, tmp_path):
    root = tmp_path / "datasets"
    assert make_data(gen, "voc2007", root, "--keep-archives", "0") == 0
    assert [f for f in os.listdir(root / "archives") if f.endswith(".tar")] == []
    assert manifest(root)["voc2007"]["counts"] == gen["counts"]["voc2007"]


LOAD = """
import json, os, sys
import transfer.train_net  # registers every dataset of the harness (semseg, DensePose too)
from detectron2.data import DatasetCatalog
from transfer.datasets import check_datasets
out = {}
for name in sys.argv[1:]:
    check_datasets([name])
    dicts = DatasetCatalog.get(name)
    files = [d["file_name"] for d in dicts] + [d["sem_seg_file_name"] for d in dicts
                                               if "sem_seg_file_name" in d]
    out[name] = [len(dicts), sum(len(d.get("annotations", [])) for d in dicts),
                 sum(not os.path.isfile(f) for f in files)]
print(json.dumps(out))
"""


def test_detectron2_loads_every_built_dataset(gen, server, tmp_path):
    """The root `make data` produced is the one the harness reads: every dataset of every task
    passes the harness's check and detectron2's own loaders read it, every image and label
    file present (the smoke runs of those tasks on such roots are tests/test_transfer_smoke.py's;
    here one task trains, voc_semseg_fcn_30k above)."""
    root = tmp_path / "datasets"
    creds = tmp_path / "cityscapes.json"
    creds.write_text(json.dumps({"username": USER, "password": PASSWORD}))
    for name in ("voc", "coco", "lvis_v0.5", "densepose", "cityscapes"):
        assert make_data(gen, name, root, "--credentials", str(creds)) == 0
    names = ["voc_2007_trainval", "voc_2007_test", "voc_2012_trainval",
             "voc_2012_train_aug_sem_seg", "voc_2012_val_sem_seg", "coco_2017_train",
             "coco_2017_val", "keypoints_coco_2017_train", "lvis_v0.5_train", "lvis_v0.5_val",
             "densepose_coco_2014_train", "densepose_coco_2014_minival",
             "cityscapes_fine_instance_seg_train", "cityscapes_fine_sem_seg_val"]
    res = subprocess.run([sys.executable, "-c", LOAD, *names], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, DETECTRON2_DATASETS=str(root),
                                            PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    c = gen["counts"]
    assert got["voc_2007_test"][0] == c["voc2007"]["VOC2007 test images"]
    assert got["voc_2012_train_aug_sem_seg"][0] == c["voc_sbd"]["train_aug images"]
    assert got["coco_2017_val"][0] == c["coco"]["instances_val2017 images"]
    assert got["lvis_v0.5_val"][1] == c["lvis_v0.5"]["lvis_v0.5_val annotations"]
    assert got["densepose_coco_2014_train"][0] == \
        c["densepose"]["densepose_train2014 images"]
    assert got["cityscapes_fine_instance_seg_train"][0] == \
        c["cityscapes"]["train images"]
    assert {name: v[2] for name, v in got.items()} == {name: 0 for name in names}


def test_a_truncated_archive_is_one_line(gen, tmp_path):
    from convert.errors import UserError
    from tools.data.extract import extract
    for name, kind in (("VOCtrainval_06-Nov-2007.tar", "tar"), ("benchmark.tgz", "tar"),
                       ("val2017.zip", "zip")):
        data = open(os.path.join(gen["archives"], name), "rb").read()
        cut = tmp_path / name
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(UserError) as e:
            extract(str(cut), kind, str(tmp_path / "out"))
        assert str(e.value).startswith(f"{cut} is not a complete {name} (")
        assert str(e.value).endswith("delete it and run again to download it afresh")


def test_a_build_killed_halfway_starts_its_staging_over(gen, server, tmp_path):
    """What a killed build leaves (a staging folder half extracted, a .part) is not read by
    the harness, and the next run finishes without downloading verified archives again."""
    root = tmp_path / "datasets"
    assert make_data(gen, "voc2007", root, "--fetch-only") == 0
    stale = root / ".staging" / "voc2007" / "VOCdevkit" / "VOC2007"
    stale.mkdir(parents=True)
    (stale / "half_written.jpg").write_bytes(b"\xff\xd8")
    server.log.clear()
    assert make_data(gen, "voc2007", root) == 0
    assert server.log == []   # the cached archives, verified, not fetched again
    assert not (root / "VOC2007" / "half_written.jpg").exists()
    assert manifest(root)["voc2007"]["counts"] == gen["counts"]["voc2007"]
