"""One logging setup and one progress-bar factory for every stage: the log line format, the
file handler a run's log.txt gets, a program's logging to a file and (or not) the terminal, and
the tqdm bar with an ETA that long work shows on stderr."""
import contextlib
import functools
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


@contextlib.contextmanager
def logging_restored():
    """The root logger as it was on entry, on exit: the handlers added inside are closed and
    removed, the ones removed inside come back, and the level is restored."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


def restores_logging(main):
    """For a program's main(args): the logging it sets up for its run (setup_logging) ends with
    it, so a caller in the same process (the demo, a test) logs on as before, and no handler is
    left writing into a run folder that may be gone."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with logging_restored():
            return main(*args, **kwargs)
    return wrapper


def progress_bar(total, desc, initial=0, unit="it"):
    """The project's progress bar: counts, percent, elapsed and ETA, on stderr."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}{postfix}]")
