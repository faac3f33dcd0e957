"""Archives unpacked into a staging folder, with a progress bar over the archive's bytes.

Tar members go through tarfile's "data" filter (no absolute paths, no ``..``, no links out of
the folder, no device files): an archive is input from outside. A truncated or foreign archive
is one line that says to delete it.
"""
import contextlib
import os
import tarfile
import zipfile

from tqdm import tqdm

from convert.errors import UserError


class _Counting:
    """A file object that moves a progress bar as it is read."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


def _bad(archive, e):
    return UserError(f"{archive} is not a complete {os.path.basename(archive)} ({e}); delete "
                     "it and run again to download it afresh")


@contextlib.contextmanager
def reading(archive):
    """A damaged or hostile archive, read inside this block, becomes one UserError line."""
    try:
        yield
    except tarfile.FilterError as e:
        raise UserError(f"{archive} holds an unsafe member ({e}): not the official "
                        "archive") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise _bad(archive, e) from None


def iter_tar(archive, progress=True, desc=None):
    """(tarfile, member) over a tar (any compression), streamed once, with a progress bar.
    Read the members inside ``reading(archive)``."""
    size = os.path.getsize(archive)
    with open(archive, "rb") as raw, tqdm(total=size, unit="B", unit_scale=True,
                                          unit_divisor=1024, disable=not progress,
                                          desc=desc or os.path.basename(archive),
                                          leave=False) as bar, reading(archive):
        with tarfile.open(fileobj=_Counting(raw, bar), mode="r|*") as tf:
            for member in tf:
                yield tf, member


def extract(archive, kind, dest, progress=True):
    os.makedirs(dest, exist_ok=True)
    if kind == "tar":
        with reading(archive):
            for tf, member in iter_tar(archive, progress):
                tf.extract(member, dest, filter="data")
    elif kind == "zip":
        with reading(archive), zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            with tqdm(total=sum(i.file_size for i in infos), unit="B", unit_scale=True,
                      unit_divisor=1024, disable=not progress, leave=False,
                      desc=os.path.basename(archive)) as bar:
                for info in infos:
                    zf.extract(info, dest)   # zipfile drops absolute parts and ".."
                    bar.update(info.file_size)
    else:
        raise ValueError(f"unknown archive kind {kind!r} (tar, zip)")
