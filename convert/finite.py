"""Weights that are numbers: NaN or Inf in pretrained weights are refused, naming the tensors.

A diverged pretraining run, or a damaged file, can hold NaN or Inf weights; converted and
fine-tuned they give a run that trains on garbage, or NaN losses far from their cause. The
converter (``convert/to_detectron2.py``) and the transfer harness (``transfer/weights.py``)
refuse them; ``--allow-nonfinite`` lets them through, for debugging.
"""
import numpy as np

ALLOW_FLAG = "--allow-nonfinite"
ALLOW_HELP = "accept pretrained weights that hold NaN or Inf (for debugging only)"


def nonfinite(named):
    """[(name, count)] of the floating-point arrays or tensors in `named` ({name: array})
    holding NaN or Inf, in order."""
    found = []
    for name, value in named.items():
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if array.dtype.kind in "fc":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                found.append((name, bad))
    return found


def describe(found, limit=5):
    """'conv1.weight (3 values), ...' for `nonfinite`'s answer."""
    shown = ", ".join(f"{name} ({n} value{'s' * (n > 1)})" for name, n in found[:limit])
    return shown + (f" and {len(found) - limit} more" if len(found) > limit else "")
