"""The foundation: detectron2 imports without its compiled ops, and its models train on CPU."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks

from transfer.d2 import CompiledOpMissing


def _fresh_python(script, tmp_path):
    """Run `script` in a new interpreter of this environment, from a folder outside the
    repository: what a user's own script or notebook gets."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, cwd=tmp_path)


def test_plain_detectron2_imports_work_in_the_environment(tmp_path):
    out = _fresh_python("""
        import sys
        import detectron2.layers, detectron2.modeling, detectron2.engine
        from detectron2.evaluation import coco_evaluation
        import detectron2._C as C
        from transfer.fast_eval import FasterCOCOeval
        assert getattr(C, "__moco_transfer_stand_in__", False)
        assert coco_evaluation.COCOeval_opt is FasterCOCOeval
        print(sorted(m for m in sys.modules if m.split(".")[0] == "transfer"))
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Error processing" not in out.stderr  # the .pth hook itself ran cleanly
    # the hook loads only the stand-in and, with detectron2's evaluation, the fast evaluator
    assert out.stdout.strip() == "['transfer', 'transfer.d2', 'transfer.fast_eval']"


def test_the_hook_imports_nothing_of_the_project_at_start_up(tmp_path):
    """The .pth hook only installs a finder: the project's packages (and detectron2, whose
    dataset registration reads DETECTRON2_DATASETS when detectron2.data is imported) load when a
    program asks; the stand-in's finder is installed by the first import of detectron2."""
    out = _fresh_python("""
        import sys
        def loaded():
            return sorted(m for m in sys.modules if m.split(".")[0] in
                          ("detectron2", "torch", "transfer", "convert", "pretrain", "results"))
        print(loaded(), [type(f).__name__ for f in sys.meta_path][:1])
        import detectron2
        from transfer.d2 import StandInFinder
        assert isinstance(sys.meta_path[0], StandInFinder), sys.meta_path
        assert sum(isinstance(f, StandInFinder) for f in sys.meta_path) == 1
        import detectron2.layers  # later imports leave the finders as they are
        print(sum(isinstance(f, StandInFinder) for f in sys.meta_path))
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[] ['FirstDetectron2Import']", "1"]


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)


def test_a_second_checkout_sharing_the_environment_runs_its_own_packages(tmp_path):
    """One environment, two checkouts (issue 38): a git worktree of this repository, run with
    this environment's interpreter, imports every project package from itself, and a change made
    only in its transfer/ is what its `python -m transfer.train_net --dry-run` runs."""
    from tests.conftest import ROOT

    second = tmp_path / "second"
    _git("worktree", "add", "--detach", str(second), "HEAD", cwd=ROOT)
    try:
        marker = "transfer/config.py of the second checkout"
        with open(second / "transfer" / "config.py", "a") as f:
            f.write(f"\nprint({marker!r})\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        where = subprocess.run(
            [sys.executable, "-c", "import os, convert, pretrain, results, transfer, transfer.d2, "
             "detectron2.layers; print('\\n'.join(os.path.dirname(m.__file__) for m in "
             "(convert, pretrain, results, transfer, transfer.d2)))"],
            cwd=second, env=env, capture_output=True, text=True)
        assert where.returncode == 0, where.stderr
        packages = where.stdout.split()
        assert packages == [str(second / p) for p in
                            ("convert", "pretrain", "results", "transfer", "transfer")]
        dry = subprocess.run(
            [sys.executable, "-m", "transfer.train_net", "--task", "voc_frcnn_c4_24k",
             "--weights", "random", "--dry-run"],
            cwd=second, env=env, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        assert marker in dry.stdout and "MODEL:" in dry.stdout
    finally:
        _git("worktree", "remove", "--force", str(second), cwd=ROOT)


def test_stand_in_raises_a_clear_error_for_a_compiled_only_op():
    import detectron2._C as C
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    assert getattr(C, "__moco_transfer_stand_in__", False)
    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(CompiledOpMissing, match="'box_iou_rotated'.*compiled extension"):
        pairwise_iou_rotated(boxes, boxes)


def test_fast_coco_evaluation_is_faster_coco_eval_without_compiled_ops():
    from detectron2.evaluation import coco_evaluation

    from transfer.fast_eval import FasterCOCOeval

    assert coco_evaluation.COCOeval_opt is FasterCOCOeval  # numbers: tests/test_fast_eval.py


def test_stand_in_is_not_used_when_a_real_extension_imports(tmp_path):
    # Simulate a compiled build: a finder that knows a real detectron2._C, as the extension
    # module of an official build would be found.
    out = _fresh_python("""
        import importlib.abc, importlib.machinery, sys

        class Compiled(importlib.abc.Loader):
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                module.marker = "compiled"

        class FindsCompiled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "detectron2._C":
                    return importlib.machinery.ModuleSpec(name, Compiled())

        sys.meta_path.append(FindsCompiled())
        import detectron2._C as C
        assert C.marker == "compiled" and not hasattr(C, "__moco_transfer_stand_in__")
        from transfer.d2 import has_compiled_ops
        assert has_compiled_ops()
        from detectron2.evaluation import coco_evaluation
        assert coco_evaluation.COCOeval_opt.__module__ == "detectron2.evaluation.fast_eval_api"
        print("ok")
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_installer_writes_the_hook_only_without_compiled_ops(tmp_path, monkeypatch):
    from tools import install_detectron2 as inst

    module = tmp_path / (inst.FIRST_IMPORT_MODULE + ".py")
    monkeypatch.setattr(inst, "compiled_ops_importable", lambda: False)
    inst.install_hook(str(tmp_path))
    assert (tmp_path / inst.HOOK_FILE).read_text() == inst.HOOK_LINE
    assert module.read_text() == open(inst.FIRST_IMPORT_SOURCE).read()
    monkeypatch.setattr(inst, "compiled_ops_importable", lambda: True)
    inst.install_hook(str(tmp_path))
    assert not (tmp_path / inst.HOOK_FILE).exists() and not module.exists()
    # and in this environment the hook is there, because the ops are missing here
    monkeypatch.undo()
    assert inst.compiled_ops_importable() is False


def _fixed_batch(keypoints=False):
    torch.manual_seed(0)
    image = (torch.rand(3, 128, 160) * 255)
    inst = Instances((128, 160))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 70.0, 100.0], [80.0, 30.0, 150.0, 90.0]]))
    inst.gt_classes = torch.tensor([0, 0 if keypoints else 1])
    inst.gt_masks = PolygonMasks([[[10, 20, 70, 20, 70, 100, 10, 100]],
                                  [[80, 30, 150, 30, 150, 90, 80, 90]]])
    if keypoints:
        kp = torch.zeros(2, 17, 3)
        kp[0, :, 0] = torch.linspace(12, 68, 17)
        kp[0, :, 1] = torch.linspace(22, 98, 17)
        kp[1, :, 0] = torch.linspace(82, 148, 17)
        kp[1, :, 1] = torch.linspace(32, 88, 17)
        kp[:, :, 2] = 2
        from detectron2.structures import Keypoints
        inst.gt_keypoints = Keypoints(kp)
    return [{"image": image, "instances": inst, "height": 128, "width": 160}]


ARCHS = {
    "faster_rcnn_c4": ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", False),
    "mask_rcnn_fpn": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", False),
    "keypoint_rcnn_fpn": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", True),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_meta_architecture_trains_on_cpu_with_naive_sync_bn(arch):
    config, keypoints = ARCHS[arch]
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = "naiveSyncBN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    torch.manual_seed(0)
    model = build_model(cfg)
    # everything trains: no frozen stage, every norm a synchronised BN (no FrozenBatchNorm2d)
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.layers.batch_norm import NaiveSyncBatchNorm

    assert [n for n, p in model.named_parameters() if not p.requires_grad] == []
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) >= 53 and all(type(m) is NaiveSyncBatchNorm for m in norms)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = _fixed_batch(keypoints)
    totals = []
    from detectron2.utils.events import EventStorage

    for it in range(6):
        with EventStorage(it):
            losses = model(batch)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert min(totals[-2:]) < totals[0], totals


def test_doctor_reports_build_datasets_and_tasks(dataset_root):
    from tests.conftest import HAVE_SHARED, ROOT

    res = subprocess.run([sys.executable, "-m", "tools.doctor"], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "detectron2   0.6" in out and "torch        2.14.1" in out
    assert "compiled ops absent" in out  # honest about the pure-Python build
    assert f"dataset root {dataset_root}" in out
    assert "coco_mask_fpn_2x" in out and "lvis_v1_train: not found" in out
    if HAVE_SHARED:
        assert "coco_2017_val: 50 images, 382 annotations" in out
        assert "voc_frcnn_c4_24k           can run" in out


def _attributes_read(package, names):
    """(module alias, attribute) for every `alias.attribute` read in a package's sources."""
    import ast
    import importlib.util

    root = os.path.dirname(importlib.util.find_spec(package).origin)
    found = set()
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                for node in ast.walk(ast.parse(open(os.path.join(folder, f), "rb").read())):
                    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                            and node.value.id in names):
                        found.add((node.value.id, node.attr))
    return found


def test_every_numpy_and_pillow_name_detectron2_reads_exists():
    """detectron2 v0.6 and lvis read np.float, np.bool, Image.LINEAR, ...: on numpy 2 and Pillow
    10+ (the second environment of `make test`, a GPU machine's Python 3.12) the stand-in's
    install answers the removed ones; here every name they read resolves, by value."""
    import numpy as np
    from PIL import Image

    modules = {"np": np, "numpy": np, "Image": Image}
    read = _attributes_read("detectron2", modules) | _attributes_read("lvis", modules)
    assert {("np", "float"), ("np", "bool"), ("np", "str"), ("Image", "LINEAR")} <= read
    missing = sorted(f"{m}.{a}" for m, a in read if not hasattr(modules[m], a))
    assert missing == []
    # the aliases mean what they meant (numpy 2's own np.bool is np.bool_)
    assert np.float is float and np.int is int and np.str is str and np.object is object
    assert np.bool in (bool, np.bool_) and Image.LINEAR == Image.BILINEAR
    # and detectron2's code paths that read them run
    from detectron2.data.transforms import ExtentTransform
    from detectron2.structures.masks import polygons_to_bitmask

    mask = polygons_to_bitmask([np.array([1.0, 1.0, 6.0, 1.0, 6.0, 5.0, 1.0, 5.0])], 8, 8)
    assert mask.dtype == bool and mask.sum() == 20
    assert ExtentTransform((0, 0, 4, 4), (4, 4)).interp == Image.BILINEAR
