"""One logging setup and one progress-bar factory for every stage: the log line format, the
file handler a run's log.txt gets, a program's logging to a file and (or not) the terminal, and
the tqdm bar with an ETA that long work shows on stderr."""
import logging
import os
import sys

from tqdm import tqdm

FORMAT = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")


def file_handler(path):
    """A handler that appends to `path` (its folder made) in the project's format."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(FORMAT)
    return handler


def setup_logging(log_file, to_console=True, level=logging.INFO):
    """The root logger writes to `log_file` (if any) and, unless `to_console` is False (a
    progress bar instead), to stdout; earlier handlers are removed."""
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    if to_console:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(FORMAT)
        root.addHandler(h)
    if log_file:
        root.addHandler(file_handler(log_file))


def progress_bar(total, desc, initial=0, unit="it"):
    """The project's progress bar: counts, percent, elapsed and ETA, on stderr."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}{postfix}]")
