"""Checkpoint formats the converter recognises, in one registry.

Each format knows how to find a ResNet backbone in a loaded checkpoint and returns it with
torchvision key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) plus the keys it
dropped on purpose (projection heads, key encoders, queues). Detection goes through the registry
in order; the first format whose ``matches`` is true wins.
"""
from collections import OrderedDict

RGB_TORCHVISION = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}
BGR_MSRA = {
    "INPUT.FORMAT": "BGR",
    "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
}

BACKBONE_TOP = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


class Format:
    """A checkpoint layout: `prefix` is where the ResNet's torchvision keys start."""

    def __init__(self, name, description, prefix, author, normalization=RGB_TORCHVISION,
                 requires=None):
        self.name = name
        self.description = description
        self.prefix = prefix
        self.author = author
        self.normalization = normalization
        self.requires = requires  # a key that must exist besides the prefix (disambiguation)

    def matches(self, state_dict):
        if self.requires and not any(k.startswith(self.requires) for k in state_dict):
            return False
        return any(k.startswith(self.prefix + t) for k in state_dict for t in BACKBONE_TOP)

    def extract(self, state_dict):
        """Return (backbone dict with torchvision names, dropped keys, head keys)."""
        backbone, dropped, heads = OrderedDict(), [], []
        for key, value in state_dict.items():
            if not key.startswith(self.prefix):
                dropped.append(key)
                continue
            name = key[len(self.prefix):]
            if name.startswith(BACKBONE_TOP):
                backbone[name] = value
            else:  # fc / projection head inside the encoder
                heads.append(key)
        return backbone, dropped, heads


def strip_module(state_dict):
    """Remove DDP's ``module.`` from every key, so saved-with and saved-without look alike."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return OrderedDict((k[len("module."):], v) for k, v in state_dict.items())
    return state_dict


# Order matters: more specific prefixes first; bare torchvision keys last.
FORMATS = [
    Format("moco", "MoCo v1/v2 (reference code, query encoder)", "encoder_q.", "MOCO"),
    Format("moco_v3", "MoCo v3 (base encoder; projector/predictor dropped)", "base_encoder.",
           "MOCO_V3"),
    Format("pixpro", "PixPro-style (online encoder)", "encoder.", "PIXPRO"),
    Format("backbone", "backbone.-prefixed (mmselfsup, solo-learn, ...)", "backbone.",
           "BACKBONE"),
    Format("torchvision", "torchvision ResNet / this project's supervised baseline (bare keys)",
           "", "torchvision"),
]
FORMATS_BY_NAME = {f.name: f for f in FORMATS}


def detect(state_dict):
    for fmt in FORMATS:
        if fmt.matches(state_dict):
            return fmt
    return None
