"""Load pretrained weights into a detectron2 model, and refuse a load that matched nothing.

detectron2 only warns when checkpoint keys do not match, so an empty or wrong conversion trains
from random init without anyone noticing. Here every pretrained ResNet parameter of the model
(stem, res2..res5, wherever the architecture puts them) must be filled, with the right shape.
"""
import logging
import re

from transfer.d2 import ensure_detectron2

ensure_detectron2()

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402

from transfer.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

# Parameters that come from the pretrained ResNet; the C4 head's extra norm does not.
_RESNET_PARAM = re.compile(r"(^|\.)(stem|res[2-5])\.")
_NEW_LAYER = re.compile(r"res5\.norm\.")


class WeightsNotLoaded(UserError, RuntimeError):
    """Weights that do not fit the model, or that cannot be fetched."""


def pretrained_resnet_keys(model):
    return [k for k in model.state_dict()
            if _RESNET_PARAM.search(k) and not _NEW_LAYER.search(k)
            and not k.endswith("num_batches_tracked")]


def load_pretrained(model, path):
    """Load `path` (local file or detectron2:// URL) with detectron2's matching heuristics.

    Returns the incompatible keys; raises WeightsNotLoaded if a pretrained ResNet parameter of
    the model stayed unfilled or had the wrong shape."""
    checkpointer = DetectionCheckpointer(model)
    try:
        local = PathManager.get_local_path(path)
    except Exception as e:
        raise WeightsNotLoaded(
            f"cannot fetch weights '{path}' ({type(e).__name__}: {e}). Without a network, "
            "download the file elsewhere and pass its local path, e.g. "
            "WEIGHTS=supervised=/path/to/R-50.pkl") from e
    checkpoint = checkpointer._load_file(local)
    incompatible = checkpointer._load_model(checkpoint)
    missing = set(incompatible.missing_keys)
    wrong = {k for k, *_ in incompatible.incorrect_shapes}
    resnet = pretrained_resnet_keys(model)
    bad = [k for k in resnet if k in missing or k in wrong]
    if bad:
        raise WeightsNotLoaded(
            f"{len(bad)} of the model's {len(resnet)} pretrained ResNet tensors were not filled "
            f"by '{path}' (missing or wrong shape), e.g. {', '.join(sorted(bad)[:6])}. "
            "The weights do not fit this model; check the conversion "
            "(convert/to_detectron2.py) and MODEL.RESNETS.DEPTH.")
    logger.info("loaded %d pretrained ResNet tensors from %s; newly initialised: %s",
                len(resnet), path, ", ".join(sorted({k.rsplit(".", 2)[0] for k in missing})[:10]))
    return incompatible
