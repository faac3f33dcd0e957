"""Which weights a run starts from: the weights spec, and what a converted .pkl says of itself.

A spec is ``random``, ``supervised`` (MSRA's R-50, detectron2's ImageNet baseline: the
registry's ``msra_r50``), a published checkpoint's name (``moco_v2_800ep``: ``make zoo`` lists
them; convert/zoo.py), ``LABEL=NAME``, ``LABEL=PATH`` or ``PATH``. A token that is an existing
file is the file, even where it is also a name.

A name is fetched and converted by ``prepare_weights`` (the program does it once, before any
process starts); the config reads the cached .pkl. Before that (a dry run) the config shows the
.pkl's future path and the normalisation the registry's layout implies, and nothing is fetched.

A .pkl written by ``convert/to_detectron2.py`` carries its input normalisation and ResNet config
(``moco_transfer`` metadata); the reference converters' outputs (``__author__`` MOCO / torchvision) are RGB with torchvision's statistics.

The .pkl is read as data only (``convert/safe_load.py``; ``trust``: --trust-checkpoint): here
for its metadata, and by the checkpointer (``checkpoint.py``) for its weights.
"""
import os
from dataclasses import dataclass

from convert import finite, safe_load, zoo
from convert.formats import RGB_TORCHVISION
from convert.to_detectron2 import normalization_problem
from transfer.errors import WeightsError

RESERVED_WEIGHTS = ("supervised", "random")


@dataclass(frozen=True)
class WeightsSpec:
    """What a weights token means: the run's label, and a file or a registry entry (neither:
    random init)."""
    label: str
    path: str = None
    entry: zoo.Entry = None

def read_weights_file(path, trust=False):
    """The unpickled .pkl (data only, latin1 as detectron2 reads Caffe2-era files)."""
    return safe_load.load_pickle(path, trust)


def _label_of_path(path):
    base = os.path.basename(path)
    for ext in (".d2.pkl", ".pkl"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base


def _looks_like_a_path(token):
    return os.sep in token or "." in token


def read_spec(spec, registry):
    """A WeightsSpec: 'random' | 'supervised' | NAME | LABEL=NAME | LABEL=PATH | PATH. An existing
    file wins over a name; a token that is neither a file nor a name is an error naming the
    nearest name (or the missing file, where it looks like a path)."""
    label, target = spec.split("=", 1) if "=" in spec else (None, spec)
    if target == "random" and label is None:
        return WeightsSpec("random")
    if os.path.isfile(target):
        return WeightsSpec(label or _label_of_path(target), path=target)
    if target in registry:
        return WeightsSpec(label or target, entry=registry[target])
    if _looks_like_a_path(target):
        return WeightsSpec(label or _label_of_path(target), path=target)
    zoo.lookup(target, registry)  # raises: unknown name, with the nearest and the known ones
    raise AssertionError(target)


def parse_weights(spec, registry_file=zoo.REGISTRY_FILE):
    """(label, path or registry name or None) of a spec: the label names the run's folder."""
    ws = read_spec(spec, zoo.load_registry(registry_file))
    return ws.label, ws.path or (ws.entry.name if ws.entry else None)


def prepare_weights(spec, opts=zoo.ZooOptions(), trust=False):
    """Fetch, verify and convert the checkpoint a spec names (nothing for a file or random);
    returns the zoo.Resolved or None. Locked per name: concurrent callers fetch once."""
    ws = read_spec(spec, zoo.load_registry(opts.registry))
    return zoo.resolve(ws.entry.name, opts, trust) if ws.entry else None


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


def _zoo_overrides(entry, opts, trust, allow_nonfinite):
    """A registry entry's config: read from its converted .pkl once cached, else what the
    registry's layout implies (a dry run: nothing fetched)."""
    pkl = zoo.converted_path(entry, opts)
    if os.path.isfile(pkl):
        overrides, meta = read_converted_metadata(pkl, trust, allow_nonfinite)
        record = meta.get("zoo", {})
    else:
        normalization, config = zoo.expected_metadata(entry)
        overrides, meta, record = dict(normalization, **config), {}, {}
    overrides["MODEL.WEIGHTS"] = os.path.abspath(pkl)
    overrides["MOCO_TRANSFER.WEIGHTS_SHA256"] = str(meta.get("sha256", ""))[:64]
    overrides["MOCO_TRANSFER.WEIGHTS_FORMAT"] = meta.get("format", entry.layout.get("format", ""))
    overrides["MOCO_TRANSFER.WEIGHTS_ZOO_NAME"] = entry.name
    overrides["MOCO_TRANSFER.WEIGHTS_SOURCE_URL"] = record.get("url", entry.urls[0])
    overrides["MOCO_TRANSFER.WEIGHTS_SOURCE_SHA256"] = record.get("source_sha256", "")
    return overrides


def weights_overrides(spec, trust=False, opts=zoo.ZooOptions(), allow_nonfinite=False):
    """(label, {config key: value}) for a weights spec. Random init uses the MoCo (RGB,
    torchvision) normalisation (PROTOCOL.md section 3). `allow_nonfinite`: --allow-nonfinite."""
    ws = read_spec(spec, zoo.load_registry(opts.registry))
    if ws.entry is not None:
        return ws.label, _zoo_overrides(ws.entry, opts, trust, allow_nonfinite)
    if ws.path is None:
        return ws.label, dict(RGB_TORCHVISION, **{"MODEL.WEIGHTS": ""})
    overrides, meta = read_converted_metadata(ws.path, trust, allow_nonfinite)
    overrides["MODEL.WEIGHTS"] = os.path.abspath(ws.path)
    overrides["MOCO_TRANSFER.WEIGHTS_SHA256"] = str(meta.get("sha256", ""))[:64]
    overrides["MOCO_TRANSFER.WEIGHTS_FORMAT"] = str(meta.get("format", ""))[:64]
    return ws.label, overrides
