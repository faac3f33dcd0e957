"""The quiet console (issue #17): one progress bar per stage, the full log in the run's files.

Quiet when the terminal is interactive (or when a caller such as ``make demo`` asks for it with
``MOCO_TRANSFER_QUIET=1``); ``MOCO_TRANSFER_VERBOSE=1`` (``-v`` of the demo and the suite,
``V=1`` for make) brings the full log back to the terminal. In quiet mode:

- detectron2's, fvcore's and this project's loggers write to the run's ``log.txt`` only (model
  printouts, per-iteration metrics, evaluation tables); Python warnings go there too;
- training shows a tqdm bar (iterations, ETA, loss) on stderr, or, under the suite (which shows
  one bar for all its runs), writes its iteration to the file named by
  ``MOCO_TRANSFER_PROGRESS_FILE`` for the suite to read.
"""
import contextlib
import logging
import os
import sys

QUIET_ENV, VERBOSE_ENV, PROGRESS_ENV = ("MOCO_TRANSFER_QUIET", "MOCO_TRANSFER_VERBOSE",
                                        "MOCO_TRANSFER_PROGRESS_FILE")
LOGGERS = ("detectron2", "fvcore", "transfer", "d2", "pretrain", "py.warnings", "")


def verbose():
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet():
    """Quiet console: asked for (MOCO_TRANSFER_QUIET=1), or an interactive terminal; never
    with MOCO_TRANSFER_VERBOSE=1."""
    if verbose():
        return False
    if os.environ.get(QUIET_ENV, "") not in ("", "0"):
        return True
    return sys.stderr.isatty()


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
            if fh is None:
                os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
                fh = logging.FileHandler(log_file)
                fh.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s",
                                                  "%m/%d %H:%M:%S"))
            lg.addHandler(fh)
        if name == "py.warnings":
            lg.propagate = False


def bar(total, desc, initial=0, unit="it"):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}{postfix}]")


def _progress_hook_class():
    from detectron2.engine import HookBase

    class ProgressHook(HookBase):
        """A tqdm bar over the training iterations (or the suite's progress file)."""

        def __init__(self, desc="train"):
            self._desc, self._bar, self._file = desc, None, os.environ.get(PROGRESS_ENV)

        def before_train(self):
            if not self._file:
                self._bar = bar(self.trainer.max_iter, self._desc, self.trainer.start_iter)

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

    return ProgressHook


def run_is_quiet():
    return quiet() or bool(os.environ.get(PROGRESS_ENV))


def quiet_run(cfg):
    """Called by train_net after detectron2's logging setup: in quiet mode, the logs go to
    <OUTPUT_DIR>/log.txt only, and prints (pycocotools' tables) to <OUTPUT_DIR>/stdout.txt."""
    if not run_is_quiet():
        return
    route_logs_to_files(os.path.join(cfg.OUTPUT_DIR, "log.txt"))
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    sys.stdout = open(os.path.join(cfg.OUTPUT_DIR, "stdout.txt"), "a", buffering=1)


def progress_hooks(cfg):
    """The training hooks of the quiet console: [] when the full log goes to the terminal."""
    if not run_is_quiet():
        return []
    return [_progress_hook_class()(
        f"{cfg.MOCO_TRANSFER.TASK} / {cfg.MOCO_TRANSFER.WEIGHTS} / seed {cfg.SEED}")]


@contextlib.contextmanager
def quiet_stdout(path):
    """Redirect Python-level stdout prints (pycocotools' tables, converters) to a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield
