"""`make data DATASET=<name>|<group>|all`: download, verify, extract, convert, count, record.

    python -m tools.data voc --root datasets                 # VOC 2007, 2012 and SBD
    python -m tools.data coco --mirror /nfs/archives          # archives looked up there first
    python -m tools.data all --fetch-only --cache /nfs/archives   # login node: download only
    python -m tools.data all --mirror /nfs/archives --offline     # compute node: build, no network
    python -m tools.data cityscapes --credentials ~/cityscapes.json
    python -m tools.data imagenet --imagenet /data/ilsvrc2012_tars
    python -m tools.data voc --verify                         # recount, compare, record

A dataset already built from the same recipe is a no-op (the manifest says so). Archives are
cached in ``--cache`` (default ``<root>/archives``) and resumed after a cut; each dataset is
extracted into ``<root>/.staging/<name>`` and its folders renamed into place only once complete;
its counts are checked against the official ones, then recorded in
``<root>/datasets-manifest.json`` (what ``make doctor`` reads). One lock per root: two builds at
once wait for each other.
"""
import argparse
import os
import shutil
import sys

import filelock

from convert.errors import UserError
from convert.fetch import fetch
from tools.data import cityscapes
from tools.data.converters import CONVERTERS
from tools.data.counts import COUNTERS, check
from tools.data.extract import extract
from tools.data.recipes import (fingerprint, forget, load_recipes, read_manifest, record,
                                remote, resolve)


def default_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("dataset", help="a dataset, a group (voc, lvis, coco_all) or all")
    p.add_argument("--root", default=None, help="dataset root (default: DETECTRON2_DATASETS "
                   "or ./datasets)")
    p.add_argument("--cache", default=None, help="archive cache (default: <root>/archives)")
    p.add_argument("--mirror", action="append", default=[],
                   help="a folder or http(s) prefix where archives are looked up by name "
                        "before the official sources (repeatable)")
    p.add_argument("--imagenet", default=None, help="the folder holding ImageNet's tars")
    p.add_argument("--fetch-only", action="store_true", help="download into the cache, stop")
    p.add_argument("--offline", action="store_true",
                   help="make no request: the cache and the mirror folders only")
    p.add_argument("--keep-archives", type=int, default=1, choices=(0, 1),
                   help="0: delete the cached archives once a dataset is built and verified")
    p.add_argument("--verify", action="store_true", help="recount built datasets, record")
    p.add_argument("--recipes", default=None, help="a recipe override (same schema)")
    p.add_argument("--credentials", default=None,
                   help='Cityscapes: a JSON file {"username": ..., "password": ...}')
    p.add_argument("--cityscapes-site", default=None, help="Cityscapes site (default: recipe)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------- fetching
def fetch_files(name, recipe, args, cache):
    """{filename: Fetched} of the dataset's files, verified."""
    mirrors = list(args.mirror) + ([args.imagenet] if args.imagenet else [])
    progress = not args.no_progress
    login, session, resolved = recipe.get("login"), None, None
    out = {}
    for f in recipe["files"]:
        r = remote(f)
        if login and not r.urls:
            try:   # the cache and the user's own zips first: no login needed
                out[r.filename] = fetch(r, cache, mirrors, offline=True, progress=progress)
                continue
            except UserError:
                if args.offline or args.credentials is None:
                    raise UserError(
                        f"{r.filename} is not in {cache} or a mirror folder, and {name} needs "
                        "an account to download: give CREDENTIALS=<json file> (--credentials) "
                        "or the zips you have as MIRROR=<folder>") from None
            if session is None:
                site = args.cityscapes_site or login["site"]
                session = cityscapes.login(site, cityscapes.read_credentials(args.credentials))
                resolved = cityscapes.remotes(site, session,
                                              [x["filename"] for x in recipe["files"]],
                                              login["checksum_source"])
            r = resolved[r.filename]
        try:
            out[r.filename] = fetch(r, cache, mirrors, offline=args.offline, progress=progress,
                                    session=session)
        except UserError as e:
            if recipe.get("manual"):
                raise UserError(f"{recipe['manual']} ({e})") from None
            raise
        got = out[r.filename]
        print(f"  {r.filename}: {got.checksum_kind}"
              f"{' (' + r.checksum_source + ')' if r.checksum_source and 'published' in got.checksum_kind else ''}"
              f", from {got.source}")
    return out


# ---------------------------------------------------------------- building
def _replace(src, dst):
    """Move a finished file or folder into place (a previous build's copy is removed first)."""
    if os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
    elif os.path.lexists(dst):
        os.remove(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)


def layout_present(root, recipe):
    return all(os.path.exists(os.path.join(root, d)) for d in recipe.get("moves", {}).values())


def count(name, recipe, root):
    counts = COUNTERS[recipe["count"]](root, recipe.get("count_options", {}))
    check(counts, recipe.get("counts", {}), name)
    return counts


def build_one(name, recipe, args, root, cache, dependents=()):
    progress = not args.no_progress
    built = read_manifest(root).get(name)
    if args.verify and not args.fetch_only:
        if not built:
            raise UserError(f"{name} is not built in {root}: make data DATASET={name} "
                            f"ROOT={root}")
        counts = count(name, recipe, root)
        record(root, name, dict(built, counts=counts))
        print(f"{name}: verified, " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return
    if built and built.get("fingerprint") == fingerprint(recipe) and not args.fetch_only \
            and layout_present(root, recipe):
        print(f"{name}: ready (built {built['built']}; VERIFY=1 recounts)")
        return
    print(f"{name}: {recipe['title']}")
    files = fetch_files(name, recipe, args, cache)
    if args.fetch_only:
        return
    for dep in recipe.get("needs", []):
        if dep not in read_manifest(root):
            raise UserError(f"{name} needs {dep}: make data DATASET={dep} ROOT={root}")
    staging = os.path.join(root, ".staging", name)
    if os.path.exists(staging):
        shutil.rmtree(staging)   # a build killed halfway: its staging is started over
    os.makedirs(staging)
    for f in recipe["files"]:
        path = files[f["filename"]].path
        if f.get("extract"):
            extract(path, f["extract"], staging, progress)
        elif not recipe.get("convert"):
            shutil.copyfile(path, os.path.join(staging, f["filename"]))
    if recipe.get("convert"):
        CONVERTERS[recipe["convert"]](staging, root, {k: v.path for k, v in files.items()},
                                      progress)
    # from here until recorded, the dataset is not ready, nor those built on it (SBD's labels
    # live in VOC2012/, which the moves below replace)
    for n in [name] + list(dependents):
        forget(root, n)
    for src, dst in recipe.get("moves", {}).items():
        if not os.path.lexists(os.path.join(staging, src)):
            raise UserError(f"the archives of {name} hold no {src}: not the official ones? "
                            f"({', '.join(files)})")
    for src, dst in recipe.get("moves", {}).items():
        _replace(os.path.join(staging, src), os.path.join(root, dst))
    counts = count(name, recipe, root)
    record(root, name, {"fingerprint": fingerprint(recipe), "counts": counts,
                        "provides": recipe.get("provides", []),
                        "files": {k: {"sha256": v.sha256, "checksum": v.checksum_kind,
                                      "source": v.source} for k, v in files.items()}})
    shutil.rmtree(staging)
    if not args.keep_archives:
        for fetched in files.values():
            if os.path.dirname(fetched.path) == cache:
                os.remove(fetched.path)
    print(f"{name}: built in {root}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def main(argv=None):
    args = parse_args(argv)
    root = os.path.abspath(args.root or default_root())
    cache = os.path.abspath(args.cache or os.path.join(root, "archives"))
    recipes = load_recipes(args.recipes)
    names = resolve(recipes, args.dataset)
    os.makedirs(root, exist_ok=True)
    lock = filelock.FileLock(os.path.join(root, ".make-data.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for another `make data` on {root} ...", flush=True)
        lock.acquire()
    try:
        for name in names:
            dependents = [n for n, r in recipes["datasets"].items() if name in r.get("needs", [])]
            build_one(name, recipes["datasets"][name], args, root, cache, dependents)
        if args.fetch_only:
            print(f"fetched into {cache}; build elsewhere with: make data "
                  f"DATASET={args.dataset} MIRROR={cache}")
    finally:
        lock.release()
    return 0


def entry(argv=None):
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
