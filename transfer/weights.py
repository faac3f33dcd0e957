"""Which weights a run starts from: the weights spec, and what a converted .pkl says of itself.

A spec is ``random``, ``supervised`` (MSRA's R-50, detectron2's ImageNet baseline),
``supervised=PATH``, ``NAME=PATH`` or ``PATH``. A .pkl written by ``convert/to_detectron2.py``
carries its input normalisation and ResNet config (``moco_transfer`` metadata); the reference
converters' outputs (``__author__`` MOCO / torchvision) are RGB with torchvision's statistics.

The .pkl is read as data only (``convert/safe_load.py``; ``trust``: --trust-checkpoint): here
for its metadata, and by the checkpointer (``checkpoint.py``) for its weights.
"""
import os

from convert import finite, safe_load
from convert.formats import BGR_MSRA, RGB_TORCHVISION
from convert.to_detectron2 import normalization_problem
from transfer.errors import WeightsError

MSRA_R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
RESERVED_WEIGHTS = ("supervised", "random")

def read_weights_file(path, trust=False):
    """The unpickled .pkl (data only, latin1 as detectron2 reads Caffe2-era files)."""
    return safe_load.load_pickle(path, trust)


def parse_weights(spec):
    """'random' | 'supervised' | 'supervised=PATH' | 'NAME=PATH' | 'PATH' -> (name, path|None)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, path
    if spec in RESERVED_WEIGHTS:
        return spec, None
    base = os.path.basename(spec)
    for ext in (".d2.pkl", ".pkl"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base, spec


def check_finite(data, path, allow_nonfinite=False):
    """Refuse pretrained weights holding NaN or Inf, naming them (--allow-nonfinite)."""
    model = data.get("model") if isinstance(data, dict) else None
    found = finite.nonfinite(model) if isinstance(model, dict) else []
    if found and not allow_nonfinite:
        raise WeightsError(f"weights '{path}': {len(found)} tensor(s) hold NaN or Inf: "
                           f"{finite.describe(found)}; {finite.ALLOW_FLAG} uses them anyway "
                           "(for debugging)")


def read_converted_metadata(path, trust=False, allow_nonfinite=False):
    """Normalisation/config overrides carried by a converted .pkl (convert/to_detectron2.py);
    its weights must be finite (`allow_nonfinite`: --allow-nonfinite)."""

    if not os.path.isfile(path):
        raise WeightsError(f"weights file '{path}' not found")
    if not path.endswith(".pkl"):
        raise WeightsError(
            f"weights '{path}' are not in detectron2's format; convert them first:\n"
            f"  python convert/to_detectron2.py {path}")
    data = read_weights_file(path, trust)
    check_finite(data, path, allow_nonfinite)
    meta = data.get("moco_transfer") if isinstance(data, dict) else None
    if meta:
        problem = normalization_problem(meta)
        if problem:
            raise WeightsError(f"weights '{path}': {problem}; re-convert them with "
                               "convert/to_detectron2.py")
        return dict(meta["normalization"], **meta.get("config", {})), meta
    author = str(data.get("__author__", "")) if isinstance(data, dict) else ""
    if author.upper() in ("MOCO", "TORCHVISION"):  # the reference converters' outputs
        return dict(RGB_TORCHVISION), {"format": author}
    raise WeightsError(
        f"weights '{path}' carry no normalisation metadata; re-convert them with "
        f"convert/to_detectron2.py (use --input-format rgb|bgr for a detectron2 .pkl)")


def weights_overrides(spec, trust=False, allow_nonfinite=False):
    """(name, {config key: value}) for a weights spec. Random init uses the MoCo (RGB,
    torchvision) normalisation (PROTOCOL.md section 3)."""
    name, path = parse_weights(spec)
    if path is None and name == "random":
        return name, dict(RGB_TORCHVISION, **{"MODEL.WEIGHTS": ""})
    if path is None and name == "supervised":
        return name, dict(BGR_MSRA, **{"MODEL.WEIGHTS": MSRA_R50})
    overrides, meta = read_converted_metadata(path, trust, allow_nonfinite)
    overrides["MODEL.WEIGHTS"] = os.path.abspath(path)
    overrides["MOCO_TRANSFER.WEIGHTS_SHA256"] = str(meta.get("sha256", ""))[:64]
    overrides["MOCO_TRANSFER.WEIGHTS_FORMAT"] = str(meta.get("format", ""))[:64]
    return name, overrides
