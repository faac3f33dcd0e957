"""The project's one downloader: a file by name, from mirrors then its official URLs, resumed
after a cut, verified, cached, locked.

``fetch(Remote(filename, urls, md5=...), cache_dir)`` returns the verified file in
``cache_dir``. In order:

- a file already in the cache is verified (its published checksum, or the sha256 recorded in the
  cache's manifest at its first download) and returned without any request;
- each mirror is tried before the official URLs: a local folder (the file is looked up there by
  its original name and used in place) or an http(s) prefix (``<prefix>/<filename>``);
- a download goes to ``<filename>.part`` and asks the rest of an existing ``.part`` with
  ``Range: bytes=N-`` (a 206 whose Content-Range starts at N is appended; a 200 means the server
  ignored the range: the part starts over); a cut connection is retried from its last byte, and
  a killed program resumes the same way the next time it runs;
- the checksum is verified before the rename to the final name; where nobody publishes one, the
  sha256 is recorded in ``<cache_dir>/fetch-manifest.json`` at the first download (atomic write)
  and checked at every later use. ``Fetched.checksum_kind`` says which kind each file has;
- one lock per file (``filelock``): two processes asking for the same file download it once;
- the free space is checked before a download starts;
- ``offline=True`` makes no request: it uses the cache and local mirrors, or says in one line
  what it would fetch and how to supply it.

Every failure a user can act on is one ``UserError`` line: 403/404/no network (after the next
mirror and URL were tried), a checksum mismatch (the part is removed), a truncated download (the
part is kept for the next run), a full disk.

Why not pooch (https://www.fatiando.org/pooch): its registry of hashes, cache and mirrors fit,
but its ``HTTPDownloader`` opens the output file with ``"w+b"`` and never sends a Range header
(pooch/downloaders.py), and ``Pooch.fetch`` downloads into a temporary file that is discarded on
failure: a cut in COCO's 18 GB train2017.zip starts over from byte 0. It also has no lock
between processes (only an atomic rename) and no notion of a checksum recorded at first
download. What is left to write once ``requests``, ``filelock`` and ``tqdm`` do their parts is
the resume logic and the order of sources, in this one module.
"""
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import shutil
from typing import Optional, Tuple

import filelock
import requests
import urllib3
from tqdm import tqdm

from convert.errors import UserError
from convert.files import write_json_atomic

MANIFEST = "fetch-manifest.json"
CHUNK = 1 << 20
# room left beside a download (the manifest, the lock, the file system's own needs)
FREE_MARGIN = 64 << 20


@dataclasses.dataclass(frozen=True)
class Remote:
    """One file and where it can be fetched from.

    ``urls``: the official sources in order (mirrors are first-class: list them too);
    ``md5``/``sha256``: a published checksum, ``checksum_source`` saying who publishes it;
    ``size``: bytes, when known (checked too)."""
    filename: str
    urls: Tuple[str, ...] = ()
    md5: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None
    checksum_source: Optional[str] = None

    def __post_init__(self):
        if os.path.basename(self.filename) != self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"a Remote's filename is a plain file name: {self.filename!r}")
        object.__setattr__(self, "urls", tuple(self.urls))

    @property
    def published(self):
        return bool(self.md5 or self.sha256)


@dataclasses.dataclass(frozen=True)
class Fetched:
    path: str
    sha256: str
    checksum_kind: str   # "published md5" | "published sha256" | "recorded sha256 ..."
    source: str          # the URL or local mirror file it came from, or "cache"


class _SourceFailed(Exception):
    """This source cannot give the file; the next one is tried."""


def _hashes(path):
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def read_manifest(cache_dir):
    """{filename: {"sha256", "size", "source", "recorded"}} of the files recorded in a cache."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): remove it to record the files' "
                        "checksums again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a manifest of checksums: remove it")
    return data


def _record(cache_dir, filename, sha256, size, source):
    with filelock.FileLock(os.path.join(cache_dir, f".{MANIFEST}.lock")):
        data = read_manifest(cache_dir)
        data[filename] = {"sha256": sha256, "size": size, "source": source,
                          "recorded": datetime.datetime.now(datetime.timezone.utc)
                          .isoformat(timespec="seconds")}
        write_json_atomic(data, os.path.join(cache_dir, MANIFEST), indent=1, sort_keys=True)


def _recorded(remote, cache_dir, mirror_dirs):
    """The sha256 recorded for this file: in the cache's manifest, else a local mirror's."""
    for folder in (cache_dir, *mirror_dirs):
        entry = read_manifest(folder).get(remote.filename)
        if entry:
            return entry["sha256"], folder
    return None, None


def _verify(path, remote, cache_dir, mirror_dirs, source):
    """(sha256, checksum kind) of a complete file; _SourceFailed if it does not match."""
    size = os.path.getsize(path)
    if remote.size is not None and size != remote.size:
        raise _SourceFailed(f"{size} bytes where {remote.size} are expected")
    md5, sha = _hashes(path)
    published = None
    if remote.sha256:
        if sha != remote.sha256.lower():
            raise _SourceFailed(f"sha256 {sha} is not the published {remote.sha256}")
        published = "published sha256"
    elif remote.md5:
        if md5 != remote.md5.lower():
            raise _SourceFailed(f"md5 {md5} is not the published {remote.md5}")
        published = "published md5"
    if published:
        # the sha256 of a verified file is recorded too: a later use that only has the name
        # (a cache given as a mirror, a login site out of reach) still checks it
        if read_manifest(cache_dir).get(remote.filename, {}).get("sha256") != sha:
            _record(cache_dir, remote.filename, sha, size, source)
        return sha, published
    expected, where = _recorded(remote, cache_dir, mirror_dirs)
    if expected is None:
        _record(cache_dir, remote.filename, sha, size, source)
        return sha, "recorded sha256 (first download)"
    if sha != expected:
        raise _SourceFailed(f"sha256 {sha} is not the one recorded at its first download "
                            f"({expected}, {os.path.join(where, MANIFEST)})")
    if where != cache_dir:
        _record(cache_dir, remote.filename, sha, size, source)
    return sha, "recorded sha256"


def _check_space(folder, needed, filename):
    free = shutil.disk_usage(folder).free
    if needed is not None and free < needed + FREE_MARGIN:
        raise UserError(f"not enough free space for {filename} in {folder}: "
                        f"{needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; free some "
                        "space or choose another cache folder")


def _content_range_start(response):
    """N of 'Content-Range: bytes N-M/T', or None."""
    value = response.headers.get("Content-Range", "")
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _download_once(url, part, remote, session, progress, timeout):
    """Append to ``part`` what ``url`` still has; True when the response ended complete."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    if remote.size is not None and offset == remote.size:
        return True
    # the bytes as stored (a compressed transfer would make ranges count other bytes)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.exceptions.RequestException as e:
        raise _SourceFailed(f"no connection ({type(e).__name__})") from None
    with response:
        if response.status_code == 416 and offset:
            # nothing left past our bytes: the part is complete (or wrong: the checksum says)
            return True
        if response.status_code >= 400:
            raise _SourceFailed(f"HTTP {response.status_code} {response.reason or ''}".strip())
        if offset and response.status_code == 206:
            if _content_range_start(response) != offset:
                raise _SourceFailed("the server answered a range that does not start at "
                                    f"byte {offset} ({response.headers.get('Content-Range')})")
            mode = "ab"
        else:
            offset, mode = 0, "wb"   # a 200: the whole file again
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else (
            remote.size - offset if remote.size is not None else None)
        _check_space(os.path.dirname(part), remaining, remote.filename)
        total = offset + remaining if remaining is not None else None
        received = 0
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=remote.filename, disable=not progress, leave=False)
        try:
            with open(part, mode) as f, bar:
                # read1: whatever has arrived, so that a cut keeps every byte received
                for chunk in iter(lambda: response.raw.read1(CHUNK), b""):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
            # (RequestException is a subclass of OSError: caught first) cut mid-file: the bytes written stay
            return False
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(f"the disk filled up while downloading {remote.filename} into "
                                f"{os.path.dirname(part)}: free some space and run again "
                                f"(the {offset + received} bytes received are kept)") from None
            raise
        return remaining is None or received >= remaining


def _download(url, part, remote, session, progress, retries, timeout):
    """Download into ``part``, resuming after cuts while each try brings bytes."""
    for _ in range(retries + 1):
        before = os.path.getsize(part) if os.path.exists(part) else 0
        if _download_once(url, part, remote, session, progress, timeout):
            return
        if (os.path.getsize(part) if os.path.exists(part) else 0) <= before:
            break
    size = os.path.getsize(part) if os.path.exists(part) else 0
    raise _SourceFailed(f"download cut after {size} bytes (run again to resume from there)")


def _sources(remote, mirrors):
    """(kind, location) in the order they are tried: mirrors first, then the official URLs."""
    for mirror in mirrors:
        if str(mirror).startswith(("http://", "https://")):
            yield "url", str(mirror).rstrip("/") + "/" + remote.filename
        else:
            yield "dir", os.path.join(os.path.expanduser(str(mirror)), remote.filename)
    for url in remote.urls:
        yield "url", url


def offline_hint(remote, cache_dir):
    """The one line that says what would be fetched and how to supply it without network."""
    where = remote.urls[0] if remote.urls else "its source"
    return (f"{remote.filename} is not in {cache_dir} and no request is made offline: it would "
            f"be fetched from {where}; copy {remote.filename} into a folder and give that folder "
            "as a mirror (MIRROR=<folder> / --mirror <folder>)")


def fetch(remote, cache_dir, mirrors=(), offline=False, progress=True, session=None,
          retries=3, timeout=60):
    """The verified file ``remote.filename``, from the cache, a mirror or an official URL.

    ``mirrors``: local folders or http(s) prefixes, tried before ``remote.urls``;
    ``session``: a ``requests.Session`` (e.g. logged in) for the downloads;
    ``retries``: resumptions after a cut, per URL, while each brings new bytes."""
    cache_dir = os.path.abspath(os.path.expanduser(str(cache_dir)))
    os.makedirs(cache_dir, exist_ok=True)
    dest = os.path.join(cache_dir, remote.filename)
    part = dest + ".part"
    mirror_dirs = [os.path.expanduser(str(m)) for m in mirrors
                   if not str(m).startswith(("http://", "https://"))]
    failures = []
    with filelock.FileLock(dest + ".lock"):
        if os.path.exists(dest):
            try:
                sha, kind = _verify(dest, remote, cache_dir, mirror_dirs, "cache")
                return Fetched(dest, sha, kind, "cache")
            except _SourceFailed as e:
                if not remote.published:
                    raise UserError(f"{dest} has changed since it was downloaded: {e}; delete "
                                    "it (and its entry in the manifest) to download it again"
                                    ) from None
                os.remove(dest)
                failures.append(f"cache: {e} (removed)")
        own = contextlib.nullcontext(session) if session else requests.Session()
        with own as http:
            for kind, location in _sources(remote, mirrors):
                if kind == "dir":
                    if not os.path.isfile(location):
                        failures.append(f"{location}: not there")
                        continue
                    try:
                        sha, checksum_kind = _verify(location, remote, cache_dir, mirror_dirs,
                                                     location)
                    except _SourceFailed as e:
                        failures.append(f"{location}: {e}")
                        continue
                    return Fetched(os.path.abspath(location), sha, checksum_kind, location)
                if offline:
                    continue
                try:
                    _download(location, part, remote, http, progress, retries, timeout)
                    sha, checksum_kind = _verify(part, remote, cache_dir, mirror_dirs, location)
                except _SourceFailed as e:
                    if "cut after" not in str(e) and os.path.exists(part) and (
                            "md5" in str(e) or "sha256" in str(e) or "bytes where" in str(e)):
                        os.remove(part)   # a wrong file: nothing of it is kept
                        e = f"{e} (removed)"
                    failures.append(f"{location}: {e}")
                    continue
                os.replace(part, dest)
                return Fetched(dest, sha, checksum_kind, location)
    if offline:
        tried = f" ({'; '.join(failures)})" if any("not there" not in f for f in failures) else ""
        raise UserError(offline_hint(remote, cache_dir) + tried)
    if not failures:
        raise UserError(f"{remote.filename}: no source to fetch it from (no URL, no mirror)")
    raise UserError(f"could not fetch {remote.filename}: " + "; ".join(failures))
