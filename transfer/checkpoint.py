"""The one owner of model weights on disk: ``TransferCheckpointer``.

detectron2's DetectionCheckpointer, as its own projects subclass it, used by training, resume
and evaluation alike, with three changes:

- ``save`` writes to a temporary file in the run folder and renames it into place, then
  rewrites ``last_checkpoint`` the same way: ``last_checkpoint`` never names a partial file.
- ``readable_checkpoint`` returns the newest checkpoint that loads: the one ``last_checkpoint``
  names, else ``model_final.pth``, else ``model_<iteration>.pth`` newest first. A truncated or
  unreadable one (disk full, a copy cut short, a bad sector) is skipped with one log line.
- every load is strict about the backbone: every pretrained ResNet parameter of the model
  (stem, res2..res5, wherever the architecture puts them) must be filled, with the right shape.
  detectron2 only warns when keys do not match, so an empty or wrong conversion would train
  from random init without anyone noticing; here it raises ``WeightsNotLoaded``.

Every file is read as data only (``convert/safe_load.py``: weights_only for .pth, a restricted
unpickler for .pkl); one that holds more is refused unless the run has --trust-checkpoint
(``trust``). A converted .pkl the config already read for its metadata (``weights.py``) is not
read again.
"""
import logging
import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

from convert import safe_load
from convert.files import atomic_open, write_text_atomic
from transfer.errors import UserError

logger = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^model_(\d+)\.pth$")
# Parameters that come from the pretrained ResNet; the C4 head's extra norm does not.
_RESNET_PARAM = re.compile(r"(^|\.)(stem|res[2-5])\.")
_NEW_LAYER = re.compile(r"res5\.norm\.")


class WeightsNotLoaded(UserError, RuntimeError):
    """Weights that do not fit the model, or that cannot be fetched."""


def pretrained_resnet_keys(model):
    return [k for k in model.state_dict()
            if _RESNET_PARAM.search(k) and not _NEW_LAYER.search(k)
            and not k.endswith("num_batches_tracked")]


def as_detectron2_checkpoint(data, filename):
    """What detectron2 makes of a loaded file: a zoo .pkl ({'model', '__author__'}) as it is,
    any other .pkl as Caffe2 blobs (name-matched), a .pth as {'model': ...} if it is not one."""
    if filename.endswith(".pkl"):
        if "model" in data and "__author__" in data:
            return data
        blobs = data.get("blobs", data)  # detection models keep theirs under 'blobs'
        return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


class TransferCheckpointer(DetectionCheckpointer):
    def __init__(self, *args, trust=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.trust = trust  # --trust-checkpoint: files that hold more than data load too
        self._verified = {}  # path -> loaded content, read once by readable_checkpoint
        self.incompatible = None  # the last load's missing/unexpected/wrong-shape keys

    # ------------------------------------------------------------ saving
    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        with atomic_open(path, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        write_text_atomic(last_filename_basename,
                          os.path.join(self.save_dir, "last_checkpoint"))

    # ------------------------------------------------------------ resuming
    def candidates(self):
        """Checkpoint paths to resume from, preferred first."""
        names = []
        if self.has_checkpoint():
            names.append(os.path.basename(self.get_checkpoint_file()))
        files = os.listdir(self.save_dir) if os.path.isdir(self.save_dir) else []
        if "model_final.pth" in files:
            names.append("model_final.pth")
        names += sorted((f for f in files if _PERIODIC.match(f)),
                        key=lambda f: int(_PERIODIC.match(f).group(1)), reverse=True)
        return [os.path.join(self.save_dir, n) for n in dict.fromkeys(names)]

    def readable_checkpoint(self):
        """The newest checkpoint that loads, or None; says in one line what it skipped
        (convert/safe_load.py's ``newest_readable``). What it read is kept for ``load``."""
        path, content = safe_load.newest_readable(
            self.candidates(), self._read, logger, self.save_dir,
            "starting from the initial weights")
        self._verified = {path: content} if path else {}
        return path

    # ------------------------------------------------------------ loading
    def load(self, path, checkpointables=None):
        """Load a checkpoint or pretrained weights (local file or detectron2:// URL)."""
        if path and not os.path.isfile(path):
            try:
                path = self.path_manager.get_local_path(path)
            except Exception as e:
                raise WeightsNotLoaded(
                    f"cannot fetch weights '{path}' ({type(e).__name__}: {e}). Without a "
                    "network, download the file elsewhere and pass its local path, e.g. "
                    "WEIGHTS=supervised=/path/to/R-50.pkl") from e
        self._source = path
        return super().load(path, checkpointables)

    def _read(self, filename):
        return as_detectron2_checkpoint(safe_load.load(filename, self.trust), filename)

    def _load_file(self, filename):
        if filename in self._verified:
            return self._verified.pop(filename)
        return self._read(filename)

    def _load_model(self, checkpoint):
        incompatible = self.incompatible = super()._load_model(checkpoint)
        missing = set(incompatible.missing_keys)
        wrong = {k for k, *_ in incompatible.incorrect_shapes}
        resnet = pretrained_resnet_keys(self.model)
        bad = [k for k in resnet if k in missing or k in wrong]
        if bad:
            raise WeightsNotLoaded(
                f"{len(bad)} of the model's {len(resnet)} pretrained ResNet tensors were not "
                f"filled by '{self._source}' (missing or wrong shape), e.g. "
                f"{', '.join(sorted(bad)[:6])}. The weights do not fit this model; check the "
                "conversion (convert/to_detectron2.py) and MODEL.RESNETS.DEPTH.")
        logger.info("loaded %d ResNet tensors from %s; newly initialised: %s", len(resnet),
                    self._source, ", ".join(sorted({k.rsplit(".", 2)[0] for k in missing})[:10]))
        return incompatible
