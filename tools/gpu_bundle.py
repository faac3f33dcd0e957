"""What a GPU machine's own Python lacks, carried in the working tree and installed offline.

The GPU machines this project borrows run Python 3.12 with torch 2.11, numpy 2 and a current
Pillow, and reach no package registry; they lack detectron2 and some of its dependencies
(the device tool's KINDS.md lists what they have). ``download`` (here, with PyPI) puts into one
folder the cp312 manylinux wheels of those packages (pure-Python ones as their wheels) and
detectron2 v0.6's hash-checked sdist; ``install`` (there, no network) installs them with pip into
the running interpreter's environment, then detectron2 with its stand-in hook
(tools/install_detectron2.py) and the project (editable, so programs run from any folder). The
bundle also carries a 28 MB sample of ../shared/data (COCO, VOC, LVIS), linked as ../shared/data
there where there is none.

    python3 -m tools.gpu_bundle download .gpu-bundle     # here: `make gpu-bundle`
    python3 -m tools.gpu_bundle install .gpu-bundle      # there: the first step of `make gpu-check`

Standard library and tools/install_detectron2.py only: it runs before anything is installed.
"""
import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from tools import install_detectron2

# (requirement, compiled?): what the GPU machines lack, at requirements-pinned.txt's versions
# where a cp312 wheel exists. Compiled ones come as cp312 manylinux wheels; pure-Python ones as
# wheels built here from their sdists where PyPI has no wheel (fvcore, antlr4). Their own
# dependencies are there already (numpy, Pillow, PyYAML, tqdm, portalocker, tabulate,
# matplotlib, scipy, pandas, opencv-python-headless, ...).
MISSING = (
    ("fvcore==0.1.5.post20221221", False),
    ("iopath==0.1.9", False),
    ("yacs==0.1.8", False),
    ("termcolor==2.4.0", False),
    ("omegaconf==2.3.0", False),
    ("antlr4-python3-runtime==4.9.3", False),
    ("hydra-core==1.3.2", False),
    ("lvis==0.5.3", False),
    ("kornia==0.9.0", False),
    # Cityscapes: the fixtures' and evaluator's labels and evaluation scripts, with their needs
    ("cityscapesscripts==2.2.4", False),
    ("appdirs==1.4.4", False),
    ("pyquaternion==0.9.9", False),
    ("coloredlogs==15.0.1", False),
    ("humanfriendly==10.0", False),
    ("pycocotools==2.0.8", True),
    ("faster-coco-eval==1.8.0", True),
    ("kornia-rs==0.2.0", True),
)
# detectron2 v0.6 reads pkg_resources, which setuptools 82 removed: installed only where missing
SETUPTOOLS = "setuptools==81.0.0"
# the real samples tools/bench_tasks.py builds its protocol-size data from (28 MB of
# ../shared/data, which does not travel): carried in the bundle, linked as ../shared/data there
SAMPLES = ("coco_tiny", "voc_tiny", "lvis_tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def download(folder):
    os.makedirs(folder, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for requirement, compiled in MISSING + ((SETUPTOOLS, False),):
        if compiled:
            cmd = ["download", "--only-binary=:all:", "--python-version", "3.12",
                   "--implementation", "cp", *platforms, "-d", folder]
        else:  # a py3-none-any wheel, PyPI's or built here from the sdist
            cmd = ["wheel", "-w", folder]
        subprocess.run([sys.executable, "-m", "pip", *cmd, "-q", "--no-deps", requirement],
                       check=True)
    install_detectron2.fetch_sdist(folder)
    for sample in SAMPLES:
        target = os.path.join(folder, "shared-data", sample)
        if not os.path.isdir(target):
            shutil.copytree(os.path.join(SHARED_DATA, sample), target)
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    size = sum(os.path.getsize(f) for f in files)
    print(f"[gpu_bundle] {folder}: {len(files)} files, {size / 2**20:.1f} MiB")
    return size


def install(folder):
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        raise SystemExit(f"error: no wheels in {folder}: run `make gpu-bundle` where PyPI is "
                         "reachable and carry the folder")
    setuptools = [w for w in wheels if os.path.basename(w).startswith("setuptools-")]
    wheels = [w for w in wheels if w not in setuptools]
    if importlib.util.find_spec("pkg_resources") is None:
        wheels += setuptools
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-cache-dir", "--disable-pip-version-check"]
    subprocess.run(pip + wheels, check=True)
    subprocess.run([sys.executable, install_detectron2.__file__, "--cache", folder], check=True)
    subprocess.run(pip + ["--no-build-isolation", "-e", ROOT], check=True)
    if not os.path.isdir(SHARED_DATA) and os.path.isdir(os.path.join(folder, "shared-data")):
        os.makedirs(os.path.dirname(SHARED_DATA), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(folder, "shared-data")), SHARED_DATA)
    print(f"[gpu_bundle] installed {len(wheels)} wheels, detectron2 and the project into "
          f"{sys.prefix}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["download", "install"])
    p.add_argument("folder")
    args = p.parse_args(argv)
    (download if args.action == "download" else install)(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
