"""At the first import of detectron2, install ``transfer/d2.py``'s stand-in for its compiled ops.

``tools/install_detectron2.py`` copies this file into the environment's site-packages (as
``moco_transfer_d2_first_import.py``) beside a one-line ``.pth`` that calls ``install()`` at
interpreter start. ``install()`` imports nothing of the project: it puts a finder first on
``sys.meta_path`` that finds nothing itself. The first time a process looks up ``detectron2`` (or
any of its modules), the finder imports ``transfer.d2`` through that process's own search path
(the checkout it runs in, or the editable install where no checkout is on the path) and installs
its ``StandInFinder``; from then on it steps aside. Several checkouts (worktrees, clones) can so
share one environment, each running its own ``transfer/``.

Standard library only, and stable: the project's code stays in the checkouts.
"""
import importlib
import importlib.util
import sys

PACKAGE = "detectron2"
STAND_IN = "transfer.d2"


def stand_in_module():
    """``transfer.d2`` as this process's search path resolves it, or None where no project's
    ``transfer`` (with a ``d2`` module) is importable."""
    try:
        if importlib.util.find_spec(STAND_IN) is None:
            return None
    except ModuleNotFoundError:  # no package named transfer at all
        return None
    return importlib.import_module(STAND_IN)


class FirstDetectron2Import:
    """A meta path finder that finds nothing; the first lookup of detectron2 installs the
    stand-in's finder (which goes first), after which this one only steps aside."""

    def __init__(self):
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if self.done or fullname.partition(".")[0] != PACKAGE:
            return None
        self.done = True
        module = stand_in_module()
        if module is not None:
            module.install()
        return None


def install():
    """Put the finder first, once (the .pth file that tools/install_detectron2.py writes)."""
    if not any(type(f).__name__ == FirstDetectron2Import.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, FirstDetectron2Import())
