"""Published checkpoints by name: ``WEIGHTS=moco_v2_800ep``, ``make zoo``.

The registry is data (``zoo.yaml``): name -> URLs, the published checksum (cited) or none,
the layout the converter reads, and what the checkpoint is. ``resolve`` turns a name into a
converted detectron2 .pkl in the cache folder:

    <cache>/<name>/<filename>        the source, fetched by convert/fetch.py (resumable,
                                     verified: the published checksum, else the sha256 recorded
                                     at first download; a cached file makes no request)
    <cache>/<name>/<name>.pkl        the converted weights (convert/to_detectron2.py, with the
                                     registry's layout), carrying the name, URL and source sha256
    <cache>/<name>/<name>.pkl.json   what the .pkl was converted from

One lock per name (filelock) around fetch and conversion: concurrent runs and ranks asking for
the same name fetch and convert it once. The cache folder defaults to
``$XDG_CACHE_HOME/moco-transfer/checkpoints`` (``~/.cache`` without it); ``--zoo-cache``
changes it, ``--mirror URL|DIR`` adds places to fetch from, ``--offline`` makes no request.

    python -m convert.zoo                  # list: method, epochs, paper, checksum kind, cached
    python -m convert.zoo moco_v2_800ep    # fetch, verify and convert one
"""
import argparse
import difflib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import yaml
from filelock import FileLock

from convert import fetch as fetcher
from convert import safe_load
from convert.errors import UserError
from convert.files import write_json_atomic
from convert.formats import BGR_MSRA, FORMATS_BY_NAME, RGB_TORCHVISION
from convert.resnet_check import detectron2_resnet_config
from convert.to_detectron2 import METADATA_KEY, convert, write_atomic

REGISTRY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo.yaml")
# published checksum kinds: (hashlib name, checked as a prefix of the hex digest?)
CHECKSUM_KINDS = {"md5": ("md5", False), "md5_prefix": ("md5", True),
                  "sha256": ("sha256", False), "sha256_prefix": ("sha256", True)}
REQUIRED = ("method", "epochs", "arch", "paper", "licence", "filename", "urls", "url_source",
            "checksum", "checksum_source", "layout")


class ZooError(UserError):
    """An unknown name, a checkpoint that cannot be fetched or does not verify."""


@dataclass(frozen=True)
class Entry:
    """One published checkpoint (a zoo.yaml entry)."""
    name: str
    method: str
    epochs: object
    arch: str
    paper: str
    licence: str
    filename: str
    urls: tuple
    url_source: str
    checksum: dict  # {kind: value} or None
    checksum_source: str
    layout: dict  # {format: name} and/or {key: a.b.c, prefix: P}
    aliases: tuple = ()
    note: str = ""

    @property
    def checksum_kind(self):
        return "published" if self.checksum else "recorded"


@dataclass(frozen=True)
class ZooOptions:
    """Where the cache is, what else to fetch from, whether requests may be made."""
    cache_dir: str = None
    mirrors: tuple = ()
    offline: bool = False
    registry: str = REGISTRY_FILE
    progress: bool = True

    @property
    def cache(self):
        return self.cache_dir or default_cache_dir(os.environ)


@dataclass(frozen=True)
class Resolved:
    """A name made into a converted .pkl."""
    entry: Entry
    pkl: str
    source: str
    url: str
    source_sha256: str
    checksum_kind: str
    record: dict = field(default_factory=dict)


def default_cache_dir(environ):
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moco-transfer", "checkpoints")


# ---------------------------------------------------------------- the registry
def load_registry(path=REGISTRY_FILE):
    """{name: Entry} (aliases included) of a registry file; a malformed one is a user error."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ZooError(f"checkpoint registry {path}: cannot be read ({e})") from e
    if not isinstance(raw, dict):
        raise ZooError(f"checkpoint registry {path}: expected name: entry mappings")
    registry = {}
    for name, item in raw.items():
        missing = [k for k in REQUIRED if not isinstance(item, dict) or k not in item]
        if missing:
            raise ZooError(f"checkpoint registry {path}: entry '{name}' lacks {missing}")
        checksum = item["checksum"]
        if checksum is not None and (not isinstance(checksum, dict) or len(checksum) != 1
                                     or next(iter(checksum)) not in CHECKSUM_KINDS):
            raise ZooError(f"checkpoint registry {path}: entry '{name}': checksum must be null "
                           f"or one of {sorted(CHECKSUM_KINDS)}")
        entry = Entry(name=str(name), urls=tuple(item["urls"]),
                      aliases=tuple(item.get("aliases", ())), note=item.get("note", ""),
                      **{k: item[k] for k in REQUIRED if k != "urls"})
        for key in (entry.name,) + entry.aliases:
            registry[key] = entry
    return registry


def names(registry):
    """The entries' own names, in the file's order."""
    return list(dict.fromkeys(e.name for e in registry.values()))


def lookup(name, registry):
    """The entry called `name`; an unknown name lists the known ones with the nearest."""
    if name in registry:
        return registry[name]
    near = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise ZooError(f"unknown checkpoint name '{name}'; {hint}known: {', '.join(names(registry))}"
                   " (make zoo lists them)")


# ---------------------------------------------------------------- the cache
def entry_dir(entry, opts):
    return os.path.join(opts.cache, entry.name)


def source_path(entry, opts):
    return os.path.join(entry_dir(entry, opts), entry.filename)


def converted_path(entry, opts):
    return os.path.join(entry_dir(entry, opts), entry.name + ".pkl")


def is_cached(entry, opts):
    return os.path.isfile(source_path(entry, opts))


def remote_of(entry):
    """The fetcher's description of the source file. A published prefix is not a full digest:
    the fetcher records the sha256 and `check_published` checks the prefix."""
    kind, value = next(iter(entry.checksum.items())) if entry.checksum else (None, None)
    full = {} if kind is None or CHECKSUM_KINDS[kind][1] else {CHECKSUM_KINDS[kind][0]: value}
    return fetcher.Remote(entry.filename, list(entry.urls), checksum_source=entry.checksum_source,
                          **full)


def digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_published(entry, path, folder):
    """The published checksum, a prefix checked as a prefix (the fetcher checks full digests
    only, so it recorded the sha256 of this file). A mismatching file in the entry's `folder` is
    removed with the record of its sha256 (the folder holds that file only), so that the next
    fetch starts clean; a mirror folder's file is refused, never removed."""
    if not entry.checksum:
        return
    kind, value = next(iter(entry.checksum.items()))
    algorithm, _ = CHECKSUM_KINDS[kind]
    got = digest(path, algorithm)
    if got.startswith(value.lower()):
        return
    removed = os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder)
    if removed:
        os.remove(path)
        manifest = os.path.join(folder, fetcher.MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)
    raise ZooError(f"weights '{entry.name}': {path} has {algorithm} {got}, not the published "
                   f"{kind} {value} ({entry.checksum_source}); refused"
                   + (" and removed: fetch it again (make zoo NAME=" + entry.name + ")"
                      if removed else ": check the mirror"))


def fetch_source(entry, opts):
    """The verified source file: (path, sha256, URL it was first fetched from, checksum kind)."""
    folder = entry_dir(entry, opts)
    try:
        got = fetcher.fetch(remote_of(entry), folder, mirrors=tuple(opts.mirrors),
                            offline=opts.offline, progress=opts.progress)
    except UserError as e:
        hint = "" if "mirror" in str(e) else (
            f"; give a mirror holding {entry.filename} (MIRROR=URL|DIR, --mirror) or copy it "
            f"into {folder}")
        raise ZooError(f"weights '{entry.name}': {e}{hint}") from None
    check_published(entry, got.path, folder)
    url = got.source
    if url == "cache":
        url = fetcher.read_manifest(folder).get(entry.filename, {}).get("source", entry.urls[0])
    return got.path, got.sha256, url, entry.checksum_kind


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def resolve(name, opts=ZooOptions(), trust=False, registry=None):
    """`name` fetched, verified and converted: a Resolved with the cached .pkl. The .pkl is
    converted again when the source it was made from is not the verified source."""
    registry = load_registry(opts.registry) if registry is None else registry
    entry = lookup(name, registry)
    os.makedirs(entry_dir(entry, opts), exist_ok=True)
    with FileLock(os.path.join(entry_dir(entry, opts), ".lock")):
        path, sha256, url, kind = fetch_source(entry, opts)
        pkl, record_path = converted_path(entry, opts), converted_path(entry, opts) + ".json"
        record = _read_json(record_path)
        if not (record and record.get("source_sha256") == sha256 and os.path.isfile(pkl)):
            record = {"name": entry.name, "url": url, "source": path, "source_sha256": sha256,
                      "checksum_kind": kind, "checksum": entry.checksum,
                      "checksum_source": entry.checksum_source}
            write_atomic(convert_entry(entry, path, record, trust), pkl)
            write_json_atomic(record, record_path, indent=1)
    return Resolved(entry, pkl, path, record["url"], sha256, kind, record)


def convert_entry(entry, path, record, trust=False):
    """The detectron2 .pkl of a fetched source, read with the registry's layout."""
    layout = entry.layout or {}
    out, info = convert(path, key=layout.get("key"), prefix=layout.get("prefix"), trust=trust)
    if layout.get("format") and info["format"] != layout["format"]:
        raise ZooError(f"{entry.name}: {path} holds a '{info['format']}' checkpoint, the registry "
                       f"says '{layout['format']}'")
    if info.get("arch") and info["arch"] != entry.arch:
        raise ZooError(f"{entry.name}: {path} holds a {info['arch']}, the registry says "
                       f"{entry.arch}")
    out[METADATA_KEY]["zoo"] = dict(record)
    return out


def expected_metadata(entry):
    """(input normalisation, ResNet config) the converted .pkl will carry, from the registry's
    layout alone: what a dry run shows before anything is fetched."""
    fmt = FORMATS_BY_NAME.get((entry.layout or {}).get("format"))
    if (entry.layout or {}).get("format") == "detectron2_caffe2":
        return BGR_MSRA, {}
    return (fmt.normalization if fmt else RGB_TORCHVISION), detectron2_resnet_config(entry.arch)


def resolve_source(name, opts=ZooOptions(), registry=None):
    """The verified source file of `name` (for readers of the original layout: lincls)."""
    registry = load_registry(opts.registry) if registry is None else registry
    entry = lookup(name, registry)
    os.makedirs(entry_dir(entry, opts), exist_ok=True)
    with FileLock(os.path.join(entry_dir(entry, opts), ".lock")):
        return entry, fetch_source(entry, opts)[0]


# ---------------------------------------------------------------- flags
def add_zoo_flags(parser):
    g = parser.add_argument_group("published checkpoints by name (make zoo lists them)")
    g.add_argument("--zoo-cache", default=None,
                   help="cache folder of fetched and converted checkpoints (default "
                        "$XDG_CACHE_HOME/moco-transfer/checkpoints, ~/.cache without it)")
    g.add_argument("--mirror", action="append", default=[],
                   help="URL or folder holding the checkpoint files under their published "
                        "names, tried before the registry's URLs (repeatable)")
    g.add_argument("--offline", action="store_true",
                   help="make no request: use the cache and --mirror folders only")
    g.add_argument("--zoo-registry", default=REGISTRY_FILE, help="the registry file (zoo.yaml)")
    return parser


def options_from_args(args, progress=True):
    return ZooOptions(cache_dir=args.zoo_cache, mirrors=tuple(args.mirror),
                      offline=args.offline, registry=args.zoo_registry, progress=progress)


def zoo_argv(opts):
    """The flags giving `opts` to a program this one starts."""
    argv = ["--zoo-registry", opts.registry]
    if opts.cache_dir:
        argv += ["--zoo-cache", opts.cache_dir]
    for m in opts.mirrors:
        argv += ["--mirror", m]
    return argv + (["--offline"] if opts.offline else [])


# ---------------------------------------------------------------- make zoo
def listing(registry, opts):
    """One line per entry: name, method, epochs, arch, checksum kind, cached, paper."""
    rows = [("name", "method", "epochs", "checksum", "cached", "paper")]
    for name in names(registry):
        e = registry[name]
        rows.append((name + (f" ({', '.join(e.aliases)})" if e.aliases else ""), e.method,
                     str(e.epochs if e.epochs is not None else "-"),
                     e.checksum_kind + (f" {next(iter(e.checksum))}" if e.checksum else ""),
                     "yes" if is_cached(e, opts) else "no", e.paper))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [" ".join(c.ljust(w) for c, w in zip(r, widths)) + " " + r[-1] for r in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Published checkpoints by name: list them, or "
                                     "fetch, verify and convert one.")
    parser.add_argument("name", nargs="?", help="a name to fetch (none: list the names)")
    parser.add_argument(safe_load.TRUST_FLAG, action="store_true", help=safe_load.TRUST_HELP)
    add_zoo_flags(parser)
    args = parser.parse_args(argv)
    opts = options_from_args(args)
    try:
        registry = load_registry(opts.registry)
        if not args.name:
            print("\n".join(listing(registry, opts)))
            print(f"cache: {opts.cache}   (WEIGHTS=<name> in make transfer / make suite; "
                  "make zoo NAME=<name> fetches one)")
            return 0
        got = resolve(args.name, opts, args.trust_checkpoint, registry)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"name        : {got.entry.name} ({got.entry.method}, {got.entry.arch})")
    print(f"source      : {got.source}")
    print(f"from        : {got.url}")
    print(f"sha256      : {got.source_sha256} ({got.checksum_kind}"
          + (f": {next(iter(got.entry.checksum.items()))[0]} "
             f"{next(iter(got.entry.checksum.values()))} checked" if got.entry.checksum
             else ": recorded at first download, checked since") + ")")
    print(f"converted   : {got.pkl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
