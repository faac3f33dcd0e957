"""The one place the harness imports detectron2 through.

detectron2's Python code imports its compiled extension ``detectron2._C`` at module level (for
deformable/rotated ops and the fast COCO evaluator). This project installs detectron2 v0.6 as
pure Python (see ``install_detectron2.py``), so when no real ``_C`` can be imported, a stand-in
module takes its place: importing works, every op that needs the extension fails with a message
naming the op, and detectron2's fast COCO evaluator (``COCOeval_opt``) is faster-coco-eval's C++
``COCOeval`` (``fast_eval.py``), which gives pycocotools' numbers.

When a real, compiled ``detectron2._C`` imports (an official build on a GPU cluster), nothing is
replaced and detectron2 is used unchanged.

Usage: ``from transfer.d2 import ensure_detectron2; ensure_detectron2()`` before importing any
``detectron2.*`` module; ``import transfer`` already does it.
"""
import importlib
import importlib.machinery
import sys
import types
import warnings

STAND_IN_ATTR = "__moco_transfer_stand_in__"

# Names detectron2 v0.6 reads from its extension. Calling any of the ops raises.
_INFO_FUNCTIONS = {
    "get_compiler_version": lambda: "none (pure-Python detectron2; transfer/d2.py stand-in)",
    "get_cuda_version": lambda: "none (no compiled ops)",
    "has_cuda": lambda: False,
}


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


def make_stand_in():
    """Build the module that stands in for ``detectron2._C``."""
    mod = types.ModuleType("detectron2._C")
    mod.__doc__ = "Stand-in for detectron2's compiled extension (see transfer/d2.py)."
    mod.__spec__ = importlib.machinery.ModuleSpec(
        "detectron2._C", None, origin="stand-in: transfer/d2.py"
    )
    mod.__file__ = "stand-in: transfer/d2.py"
    setattr(mod, STAND_IN_ATTR, True)
    for name, fn in _INFO_FUNCTIONS.items():
        setattr(mod, name, fn)

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_op(name)

    mod.__getattr__ = __getattr__
    return mod


def _real_extension_importable():
    if "detectron2._C" in sys.modules:
        return not getattr(sys.modules["detectron2._C"], STAND_IN_ATTR, False)
    try:
        importlib.import_module("detectron2._C")
        return True
    except ImportError:
        return False


def _use_faster_coco_eval():
    from detectron2.evaluation import coco_evaluation

    from transfer.fast_eval import FasterCOCOeval

    # COCOEvaluator picks `COCOeval_opt if use_fast_impl else COCOeval`: the fast one, whose
    # C++ half is in the missing extension, becomes faster-coco-eval's C++ COCOeval (same
    # numbers as pycocotools; tests/test_fast_eval.py).
    coco_evaluation.COCOeval_opt = FasterCOCOeval


_state = {}


def ensure_detectron2():
    """Make detectron2 importable; returns True if the real compiled ops are present."""
    if "compiled" in _state:
        return _state["compiled"]
    # detectron2 v0.6 on current torch/setuptools: deprecation notices, not problems
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
    import detectron2  # noqa: F401  (fails loudly if detectron2 is not installed at all)

    compiled = _real_extension_importable()
    if not compiled:
        stand_in = make_stand_in()
        sys.modules["detectron2._C"] = stand_in
        detectron2._C = stand_in
        _use_faster_coco_eval()
    _state["compiled"] = compiled
    return compiled


def has_compiled_ops():
    return ensure_detectron2()
