"""A second environment layered over the first: a few packages of its own, the rest shared.

``make test`` runs a stated subset of the tests in an environment with numpy 2 and current Pillow
(``requirements-numpy2.txt``) and the same torch, detectron2 and everything else as ``.venv``,
without installing torch again. This makes it: a venv of the same Python, the listed packages
installed into it (no dependencies: the rest comes from the base), and a ``.pth`` that appends the
base environment's site-packages (processing its ``.pth`` files: the editable install and the
stand-in's hook) after its own. It then checks, in the new environment, that each listed package
imports at its pinned version and torch from the base.

    python -m tools.layer_env NEW_VENV requirements-numpy2.txt   (run with the base's python)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig

LAYER_PTH = "zz_layer_over_base.pth"


def pinned(requirements):
    """{name: version} of a file of `name==version` lines."""
    pins = {}
    with open(requirements) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[name.strip().lower()] = version.strip()
    return pins


def env_python(venv):
    return os.path.join(venv, "bin", "python")


def purelib(python):
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def versions_in(python, names):
    """The installed versions of names, and torch's location, as the env's python sees them."""
    code = ("import importlib.metadata as m, json, sys, torch; "
            "print(json.dumps({'versions': {n: m.version(n) for n in sys.argv[1:]}, "
            "'torch': torch.__file__}))")
    out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def build(venv, requirements):
    if os.path.exists(venv):
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = env_python(venv)
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "-r", requirements], check=True)
    base = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib(python), LAYER_PTH), "w") as f:
        f.write(f"import site; site.addsitedir({base!r})\n")
    return python


def check(python, requirements):
    """Lines that say what differs from the request; empty where all is as asked."""
    pins = pinned(requirements)
    seen = versions_in(python, sorted(pins))
    wrong = [f"{n} {seen['versions'][n]} (asked {v})" for n, v in sorted(pins.items())
             if seen["versions"][n] != v]
    base = sysconfig.get_paths()["purelib"]
    if not seen["torch"].startswith(base):
        wrong.append(f"torch from {seen['torch']}, not from {base}")
    return wrong


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("venv")
    p.add_argument("requirements", help="name==version lines installed into the new layer")
    args = p.parse_args(argv)
    python = build(args.venv, args.requirements)
    wrong = check(python, args.requirements)
    if wrong:
        print("error: the layered environment is not what was asked: " + "; ".join(wrong))
        return 1
    pins = pinned(args.requirements)
    print(f"[layer_env] {args.venv}: " + ", ".join(f"{n} {v}" for n, v in pins.items())
          + f" over {sysconfig.get_paths()['purelib']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
