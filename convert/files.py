"""Files every stage writes and checks: written whole or not at all, and their sha256.

The bottom of the pipeline (convert <- pretrain, convert <- transfer, results), so every stage
writes through the same two lines of code.
"""
import contextlib
import hashlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a temporary file beside ``path``; on a clean exit it is renamed to ``path``.

    A kill or an exception leaves ``path`` as it was (old content or absent), never half
    written, and removes the temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text, path):
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(obj, path, **kwargs):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **kwargs)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_lines(path):
    """The records of a JSON-lines file (detectron2's metrics.json): [] when it does not exist; a
    line that is not JSON (cut by a kill) is skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
