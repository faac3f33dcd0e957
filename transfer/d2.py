"""Stand-in for detectron2's compiled ops, loaded by an import hook when they are missing.

detectron2's Python code imports its compiled extension ``detectron2._C`` at module level (for
deformable/rotated ops and the fast COCO evaluator). This project installs detectron2 v0.6 as
pure Python (``tools/install_detectron2.py``), and with it a ``.pth`` file whose finder
(``tools/d2_first_import.py``) calls ``install()`` at the first import of detectron2, from the
``transfer`` that the importing process's search path finds (its own checkout). ``install()`` puts
``StandInFinder`` first on ``sys.meta_path``. It asks the other finders, and steps in only where
they find no compiled extension:

- ``detectron2._C``: a module where importing works and every op that needs the extension raises
  ``CompiledOpMissing`` naming the op;
- ``detectron2.evaluation.fast_eval_api``, when ``_C`` is the stand-in: detectron2's module with
  ``COCOeval_opt`` (whose C++ half is in the missing extension) set to faster-coco-eval's C++
  ``COCOeval`` (``fast_eval.FasterCOCOeval``), which gives pycocotools' numbers.

``install()`` also answers the numpy and Pillow names detectron2 v0.6 reads that later versions
removed (``REMOVED_ALIASES``: ``np.float``, ``Image.LINEAR``, ...), so the same detectron2 runs on
numpy 1 and 2, Pillow 9 and current.

With a real, compiled ``detectron2._C`` (an official build on a GPU cluster), the real
module is returned and detectron2 is used unchanged; ``tools/install_detectron2.py`` then
writes no ``.pth`` at all. Plain ``import detectron2.layers`` works either way.
"""
import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

STAND_IN_ATTR = "__moco_transfer_stand_in__"
EXTENSION = "detectron2._C"
FAST_EVAL_API = "detectron2.evaluation.fast_eval_api"

# Names detectron2 v0.6 reads from its extension. Calling any of the ops raises.
_INFO_FUNCTIONS = {
    "get_compiler_version": lambda: "none (pure-Python detectron2; transfer/d2.py stand-in)",
    "get_cuda_version": lambda: "none (no compiled ops)",
    "has_cuda": lambda: False,
}


# Names detectron2 v0.6 (and lvis 0.5.3, its LVIS evaluator's API) read that later numpy and
# Pillow removed, each as (module, name, what it meant): numpy's aliases of the builtins
# (deprecated in 1.20, removed in 1.24; numpy 2 brought back np.bool as np.bool_, which is left
# alone) and Pillow's Image.LINEAR (removed in 10.0; it was BILINEAR). Set only where missing.
REMOVED_ALIASES = (
    ("numpy", "bool", "builtins.bool"),
    ("numpy", "int", "builtins.int"),
    ("numpy", "float", "builtins.float"),
    ("numpy", "str", "builtins.str"),
    ("numpy", "object", "builtins.object"),
    ("PIL.Image", "LINEAR", "PIL.Image.BILINEAR"),
)


def _resolve(dotted):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def answer_removed_aliases():
    """Give numpy and PIL.Image the names detectron2 v0.6 reads where this environment's
    versions removed them; return the (module, name) pairs set."""
    answered = []
    for module_name, name, meaning in REMOVED_ALIASES:
        module = importlib.import_module(module_name)
        with warnings.catch_warnings():  # numpy < 1.24 warns on the deprecated names
            warnings.simplefilter("ignore")
            present = hasattr(module, name)
        if not present:
            setattr(module, name, _resolve(meaning))
            answered.append((module_name, name))
    return answered


class CompiledOpMissing(RuntimeError):
    """A detectron2 operation that exists only in the compiled extension was called."""


def _missing_op(name):
    def op(*args, **kwargs):
        raise CompiledOpMissing(
            f"detectron2 op '{name}' needs detectron2's compiled extension (detectron2._C), "
            "which this installation does not have (pure-Python detectron2 v0.6 from "
            "`make setup`). Use a config that avoids it (no deformable convs, rotated boxes "
            "or rotated ROIAlign), or install a compiled detectron2 into this environment."
        )

    op.__name__ = name
    return op


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing_op(name)


def is_stand_in(module):
    return bool(getattr(module, STAND_IN_ATTR, False))


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # a plain module object

    def exec_module(self, module):
        module.__doc__ = "Stand-in for detectron2's compiled extension (see transfer/d2.py)."
        setattr(module, STAND_IN_ATTR, True)
        for name, fn in _INFO_FUNCTIONS.items():
            setattr(module, name, fn)
        module.__getattr__ = _module_getattr


class _FasterCOCOevalLoader(importlib.abc.Loader):
    """detectron2's own fast_eval_api module, with COCOeval_opt replaced after it ran."""

    def __init__(self, real_loader):
        self.real_loader = real_loader

    def create_module(self, spec):
        return self.real_loader.create_module(spec)

    def exec_module(self, module):
        self.real_loader.exec_module(module)
        if is_stand_in(sys.modules.get(EXTENSION)):
            # here, not at the top: nothing heavy until detectron2's evaluation is imported
            from transfer.fast_eval import FasterCOCOeval

            module.COCOeval_opt = FasterCOCOeval


class StandInFinder(importlib.abc.MetaPathFinder):
    """Serves ``detectron2._C`` where no real one is found, and wraps ``fast_eval_api``."""

    def _real_spec(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    return spec
        return None

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in (EXTENSION, FAST_EVAL_API):
            return None
        spec = self._real_spec(fullname, path, target)
        if fullname == EXTENSION and spec is None:
            return importlib.machinery.ModuleSpec(EXTENSION, _StandInLoader(),
                                                  origin="stand-in: transfer/d2.py")
        if fullname == FAST_EVAL_API and spec is not None:
            spec.loader = _FasterCOCOevalLoader(spec.loader)
        return spec


def install():
    """Put the finder first, once (at detectron2's first import: tools/d2_first_import.py)."""
    # detectron2 v0.6 on current torch/setuptools: deprecation notices, not problems
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
    answer_removed_aliases()
    if not any(isinstance(f, StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, StandInFinder())


def has_compiled_ops():
    """True if detectron2's real compiled extension is in use."""
    import detectron2._C

    return not is_stand_in(detectron2._C)
