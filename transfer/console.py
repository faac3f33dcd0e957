"""The quiet console (issue #17): one progress bar per stage, the full log in the run's files.

How a run talks to the terminal is an option of the program that runs it (``add_console_flags``:
``--quiet``, ``--verbose``, ``--progress-file``; ``V=1`` for make), carried as a ``Console``
value: quiet when asked, or by default when stderr is an interactive terminal; ``--verbose``
brings the full log back. In quiet mode:

- detectron2's, fvcore's and this project's loggers write to the run's ``log.txt`` only (model
  printouts, per-iteration metrics, evaluation tables); Python warnings go there too; prints
  (pycocotools' tables) go to ``stdout.txt``;
- training shows a tqdm bar (iterations, ETA, loss) on stderr or, with ``--progress-file``
  (what the suite passes: it shows one bar for all its runs), writes its iteration to that file.
"""
import argparse
import contextlib
import dataclasses
import logging
import os
import sys

from detectron2.engine import HookBase

from convert.logs import file_handler, progress_bar

LOGGERS = ("detectron2", "fvcore", "transfer", "d2", "pretrain", "py.warnings", "")


@dataclasses.dataclass(frozen=True)
class Console:
    """quiet: logs to files and a progress bar; progress_file: the iteration goes there
    instead of a bar (a parent program draws it)."""
    quiet: bool = False
    progress_file: str = ""


def add_console_flags(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true",
                       help="logs to the run's files, a progress bar on the terminal (the "
                            "default on an interactive terminal)")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="the full log on the terminal (make: V=1)")
    parser.add_argument("--progress-file", default="", help=argparse.SUPPRESS)
    return parser


def console_from_args(args):
    quiet = args.quiet or bool(args.progress_file) or \
        (not args.verbose and sys.stderr.isatty())
    return Console(quiet=quiet, progress_file=args.progress_file)


def console_flags(console):
    """The command-line flags that give a program this console."""
    return ["--quiet"] if console.quiet else ["--verbose"]


def _is_console(handler):
    return isinstance(handler, logging.StreamHandler) and \
        getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__,
                                            sys.__stderr__)


def route_logs_to_files(log_file=None, names=LOGGERS):
    """Remove the terminal handlers of the given loggers (their file handlers stay); with
    `log_file`, loggers left without any handler write there. Warnings are logged too."""
    logging.captureWarnings(True)
    fh = None
    for name in names:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if _is_console(h):
                lg.removeHandler(h)
        if log_file and not lg.handlers and (name == "" or not lg.propagate or name ==
                                             "py.warnings"):
            fh = fh or file_handler(log_file)
            lg.addHandler(fh)
        if name == "py.warnings":
            lg.propagate = False


class ProgressHook(HookBase):
    """A tqdm bar over the training iterations, or the iteration written to a progress file."""

    def __init__(self, desc, progress_file=""):
        self._desc, self._bar, self._file = desc, None, progress_file

    def before_train(self):
        if not self._file:
            self._bar = progress_bar(self.trainer.max_iter, self._desc, self.trainer.start_iter)

    def after_step(self):
        done = self.trainer.iter + 1
        if self._file:
            if done % 5 == 0 or done == self.trainer.max_iter:
                with open(self._file, "w") as f:
                    f.write(str(done))
            return
        self._bar.update(done - self._bar.n)
        if done % 10 == 0:
            try:
                loss = self.trainer.storage.history("total_loss").latest()
                self._bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            except KeyError:
                pass

    def after_train(self):
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def quiet_run(cfg, console):
    """Around a run, after detectron2's logging setup: in quiet mode the logs go to
    <OUTPUT_DIR>/log.txt only, and prints (pycocotools' tables) to <OUTPUT_DIR>/stdout.txt."""
    if not console.quiet:
        yield
        return
    route_logs_to_files(os.path.join(cfg.OUTPUT_DIR, "log.txt"))
    with quiet_stdout(os.path.join(cfg.OUTPUT_DIR, "stdout.txt")):
        yield


def progress_hooks(cfg, console):
    """The training hooks of the quiet console: [] when the full log goes to the terminal."""
    if not console.quiet:
        return []
    return [ProgressHook(f"{cfg.MOCO_TRANSFER.TASK} / {cfg.MOCO_TRANSFER.WEIGHTS} / seed "
                         f"{cfg.SEED}", console.progress_file)]


@contextlib.contextmanager
def quiet_stdout(path):
    """Redirect Python-level stdout prints (pycocotools' tables, converters) to a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", buffering=1) as f, contextlib.redirect_stdout(f):
        yield
