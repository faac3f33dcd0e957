"""Shared test setup.

The real samples live in ../shared/data (never copied into the project). A session-wide dataset
root is laid out from them with symbolic links and exported as DETECTRON2_DATASETS before
detectron2 registers its builtin datasets. Without ../shared only the tests that need it skip.
"""
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
HAVE_SHARED = os.path.isdir(os.path.join(SHARED_DATA, "coco_tiny"))

_DATASET_ROOT = tempfile.mkdtemp(prefix="moco-transfer-datasets-")
os.environ["DETECTRON2_DATASETS"] = _DATASET_ROOT  # before detectron2.data registers datasets
# the programs' default OpenMP policy (convert/runtime.py), already in the environment of the
# programs the tests start: none of them needs to start itself again to get it
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
if HAVE_SHARED:
    sys.path.insert(0, ROOT)
    from tools.sample_data import layout  # noqa: E402  (no detectron2 import)

    layout(SHARED_DATA, _DATASET_ROOT)

requires_shared = pytest.mark.skipif(
    not HAVE_SHARED,
    reason=f"needs the real samples in {SHARED_DATA} (../shared/data beside the checkout)")


def pytest_sessionfinish(session, exitstatus):
    """The session's dataset root goes with it (links to ../shared and files the tests laid out
    there; one was left in the temporary folder per run)."""
    shutil.rmtree(_DATASET_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def dataset_root():
    return _DATASET_ROOT


@pytest.fixture(scope="session")
def labeled_images(tmp_path_factory):
    """A tiny labelled image folder for classification runs: 2 classes x 8 random 40 px PNGs."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(1)
    for i in range(16):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(
            root / f"c{i % 2}" / f"{i}.png")
    return str(root)


@pytest.fixture
def marker(tmp_path):
    """A file an attack's payload would create: it must never appear."""
    return tmp_path / "payload_ran"


@pytest.fixture(scope="module")
def r18():
    """A torchvision ResNet-18's state dict (real checkpoint content)."""
    import torchvision

    return torchvision.models.resnet18().state_dict()
