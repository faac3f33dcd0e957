"""Install detectron2 v0.6 as a pure-Python package, hash-checked, into the running interpreter.

PyPI has no usable detectron2 wheel for current torch. The sdist of ``pb1-detectron2==0.6``
carries the official v0.6 ``detectron2/`` Python package byte for byte (model-zoo configs
included) but not the C++/CUDA sources, so ``pip install`` fails at the extension build. We take
the Python package from it as it is, and write ``moco_transfer_d2.pth`` beside it with a copy of
``tools/d2_first_import.py``: at every interpreter start it installs a finder that imports nothing
of the project until the first import of detectron2, which then installs ``transfer/d2.py``'s
import hook (the stand-in for the compiled ops) from the ``transfer`` that process's search path
finds, so several checkouts can share one environment. Plain ``import detectron2.layers,
detectron2.modeling`` works in the environment (a user's script, a notebook, detectron2's own
tools).

If a detectron2 is already importable (for example a compiled official build on a GPU cluster),
it is left alone, and the hook is written only if its compiled ops are missing. Standard library
and ``convert/files.py`` only: this runs before the project's requirements are used.

    python tools/install_detectron2.py [--cache DIR] [--force]
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import urllib.request

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert.files import sha256_of, write_text_atomic  # noqa: E402

SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
VERSION = "0.6"
HOOK_FILE = "moco_transfer_d2.pth"
# the finder the .pth installs, copied from tools/ (standard library only, imports no project code)
FIRST_IMPORT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "d2_first_import.py")
FIRST_IMPORT_MODULE = "moco_transfer_d2_first_import"
# One line, run by `site` at start-up. Guarded: with the module removed it does nothing.
HOOK_LINE = (f'import importlib.util as u; u.find_spec("{FIRST_IMPORT_MODULE}") and '
             f'__import__("{FIRST_IMPORT_MODULE}").install()\n')
# the finders a check for the real compiled ops must not see
HOOK_FINDERS = ("StandInFinder", "FirstDetectron2Import")


def fetch_sdist(cache_dir):
    """Return the path of the verified sdist, downloading it into cache_dir if needed."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, os.path.basename(SDIST_URL))
    if os.path.exists(path) and sha256_of(path) == SDIST_SHA256:
        return path
    print(f"[install_detectron2] downloading {SDIST_URL}")
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(SDIST_URL, timeout=120) as resp:
        shutil.copyfileobj(resp, out)
    digest = sha256_of(tmp)
    if digest != SDIST_SHA256:
        os.remove(tmp)
        raise SystemExit(
            f"[install_detectron2] sha256 mismatch for {SDIST_URL}: got {digest}, "
            f"expected {SDIST_SHA256}. Refusing to install."
        )
    os.replace(tmp, path)
    return path


def install_from_sdist(sdist, site_packages):
    """Copy the sdist's detectron2/ package into site_packages and record it for pip."""
    prefix = f"pb1-detectron2-{VERSION}/"
    staging = tempfile.mkdtemp(dir=site_packages, prefix=".detectron2-")
    records = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(prefix + "detectron2/"):
                continue
            rel = member.name[len(prefix):]
            dest = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with tar.extractfile(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            records.append(rel)
    target = os.path.join(site_packages, "detectron2")
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(os.path.join(staging, "detectron2"), target)
    shutil.rmtree(staging)

    dist_info = os.path.join(site_packages, f"detectron2-{VERSION}.dist-info")
    os.makedirs(dist_info, exist_ok=True)
    with open(os.path.join(dist_info, "METADATA"), "w") as f:
        f.write(
            f"Metadata-Version: 2.1\nName: detectron2\nVersion: {VERSION}\n"
            f"Summary: detectron2 v0.6 Python sources (from pb1-detectron2 sdist "
            f"sha256 {SDIST_SHA256}), no compiled ops\n"
        )
    with open(os.path.join(dist_info, "INSTALLER"), "w") as f:
        f.write("moco-transfer\n")
    with open(os.path.join(dist_info, "RECORD"), "w") as f:
        for rel in records + [f"detectron2-{VERSION}.dist-info/{n}" for n in
                              ("METADATA", "INSTALLER", "RECORD")]:
            f.write(f"{rel},,\n")
    print(f"[install_detectron2] installed detectron2 {VERSION} ({len(records)} files) "
          f"into {site_packages}")


def compiled_ops_importable():
    """Whether detectron2's real extension imports, asked of a fresh interpreter (this one may
    already carry the hook)."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            f"if type(f).__name__ not in {HOOK_FINDERS!r}]; import detectron2._C")
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def install_hook(site_packages):
    """Write the .pth (and the finder it installs) that installs the stand-in for detectron2's
    compiled ops at detectron2's first import, or remove them where the real ops import."""
    path = os.path.join(site_packages, HOOK_FILE)
    module = os.path.join(site_packages, FIRST_IMPORT_MODULE + ".py")
    if compiled_ops_importable():
        for p in (path, module):
            if os.path.exists(p):
                os.remove(p)
        print("[install_detectron2] detectron2's compiled ops import: no stand-in hook")
        return
    with open(FIRST_IMPORT_SOURCE) as f:
        write_text_atomic(f.read(), module)  # before the .pth that imports it
    write_text_atomic(HOOK_LINE, path)
    print(f"[install_detectron2] compiled ops missing: stand-in hook {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/moco-transfer"),
                        help="where the verified sdist is kept between installs")
    parser.add_argument("--force", action="store_true",
                        help="reinstall even if a detectron2 is importable")
    args = parser.parse_args(argv)

    site_packages = sysconfig.get_paths()["purelib"]
    spec = importlib.util.find_spec("detectron2")
    if spec is not None and not args.force:
        where = os.path.dirname(spec.origin or "")
        print(f"[install_detectron2] detectron2 already importable from {where}; leaving it alone")
    else:
        install_from_sdist(fetch_sdist(args.cache), site_packages)
    install_hook(site_packages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
