"""Checkpoint formats the converter recognises, in one registry.

Each format knows how to find a ResNet backbone in a loaded checkpoint and returns it with
torchvision key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) plus the keys it
dropped on purpose (projection heads, key encoders, queues). Detection goes through the registry
in order; the first format that finds a ResNet where it looks (``locate``) wins. Any other
layout is named by the user: ``--key a.b.c`` (the sub-dict holding the weights) and ``--prefix P``
(where the ResNet's keys start), ``custom_format``.
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
# torchvision's ResNet saved as nn.Sequential(*list(resnet.children())[:-1]): its children
# numbered conv1 0, bn1 1, relu 2, maxpool 3, layer1..layer4 4..7, avgpool 8 (fc dropped)
SEQUENTIAL_RESNET = (("0.", "conv1."), ("1.", "bn1."), ("4.", "layer1."), ("5.", "layer2."),
                     ("6.", "layer3."), ("7.", "layer4."))


class Format:
    """A checkpoint layout: the weights are the sub-dict at `key` (a dotted path; None: the
    usual places, see `default_state_dict`), and the ResNet's torchvision keys start with
    `prefix` in it. `encoder` names the network taken where a method trains several;
    `others` lists the ones not taken, as (name, option that takes it instead)."""

    def __init__(self, name, description, prefix, author, normalization=RGB_TORCHVISION,
                 key=None, encoder=None, others=(), renames=()):
        self.name = name
        # (start, torchvision start) pairs applied after the prefix: a ResNet saved as
        # nn.Sequential(*children()[:-1]) numbers its children (SEQUENTIAL_RESNET)
        self.renames = renames
        self.description = description
        self.prefix = prefix
        self.author = author
        self.normalization = normalization
        self.key = key
        self.encoder = encoder
        self.others = others

    def torchvision_name(self, name):
        """A (prefix-stripped) key under its torchvision name."""
        for start, tv in self.renames:
            if name.startswith(start):
                return tv + name[len(start):]
        return name

    def matches(self, state_dict):
        return any(self.torchvision_name(k[len(self.prefix):]).startswith(BACKBONE_TOP)
                   for k in state_dict if k.startswith(self.prefix))

    def locate(self, ckpt):
        """The state dict (DDP's ``module.`` stripped) this layout reads in `ckpt`, or None."""
        sd = sub_dict(ckpt, self.key) if self.key else default_state_dict(ckpt)
        if not isinstance(sd, dict):
            return None
        sd = strip_module(sd)
        return sd if self.matches(sd) else None

    def others_present(self, ckpt):
        """The encoders this layout does not take that `ckpt` holds: [(name, option)]."""
        sd = self.locate(ckpt) or {}
        found = []
        for name, option in self.others:
            flag, value = option.split(" ", 1)
            if (isinstance(sub_dict(ckpt, value), dict) if flag == "--key"
                    else Format("", "", value, "", renames=self.renames).matches(sd)):
                found.append((name, option))
        return found

    def extract(self, state_dict):
        """Return (backbone dict with torchvision names, dropped keys, head keys)."""
        backbone, dropped, heads = OrderedDict(), [], []
        for key, value in state_dict.items():
            if not key.startswith(self.prefix):
                dropped.append(key)
                continue
            name = self.torchvision_name(key[len(self.prefix):])
            if name.startswith(BACKBONE_TOP):
                backbone[name] = value
            else:  # fc / projection head inside the encoder
                heads.append(key)
        return backbone, dropped, heads


def sub_dict(ckpt, path):
    """``ckpt[a][b][c]`` for path "a.b.c" (a key may itself hold dots), or None."""
    node, rest = ckpt, path.split(".")
    while rest:
        if not isinstance(node, dict):
            return None
        for n in range(len(rest), 0, -1):  # the longest run of parts that is a key
            if ".".join(rest[:n]) in node:
                node, rest = node[".".join(rest[:n])], rest[n:]
                break
        else:
            return None
    return node


def default_state_dict(ckpt):
    """The weights of a checkpoint that does not say where they are: 'state_dict', 'model' or
    'module' if one is a dict, else the checkpoint itself if it is a dict of tensors."""
    if not isinstance(ckpt, dict):
        return None
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
        return ckpt
    return None


def strip_module(state_dict):
    """Remove DDP's ``module.`` from every key, so saved-with and saved-without look alike."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return OrderedDict((k[len("module."):], v) for k, v in state_dict.items())
    return state_dict


# Order matters: more specific layouts first; bare torchvision keys last. Where a method trains
# several encoders, the one taken is the one the method evaluates with (its linear evaluation
# and transfer): MoCo's query encoder, MoCo v3's base encoder, BYOL's online network, DINO's
# teacher; the others are listed in the converter's output with the option that takes them.
FORMATS = [
    Format("moco", "MoCo v1/v2 (reference code; make pretrain, every --mechanism)",
           "encoder_q.", "MOCO",
           encoder="query encoder (what MoCo evaluates)",
           others=(("key encoder", "--prefix encoder_k."),)),
    Format("moco_v3", "MoCo v3 (projector/predictor dropped)", "base_encoder.", "MOCO_V3",
           encoder="base encoder (what MoCo v3 evaluates)",
           others=(("momentum encoder", "--prefix momentum_encoder."),)),
    Format("byol", "BYOL-style online/target networks", "online_network.encoder.", "BYOL",
           encoder="online network (what BYOL evaluates)",
           others=(("target network", "--prefix target_network.encoder."),)),
    # several public BYOL / SimCLR re-implementations: the encoder an nn.Sequential of the
    # ResNet's children, the online network saved under its own key
    Format("byol_sequential", "BYOL-style, encoder = nn.Sequential(ResNet children) "
           "(online_network_state_dict)", "encoder.", "BYOL", key="online_network_state_dict",
           encoder="online network (what BYOL evaluates)", renames=SEQUENTIAL_RESNET,
           others=(("target network", "--key target_network_state_dict"),)),
    Format("byol_nested", "BYOL-style, {'online_network': {'encoder.*'}}", "encoder.", "BYOL",
           key="online_network", encoder="online network (what BYOL evaluates)",
           renames=SEQUENTIAL_RESNET,
           others=(("target network", "--key target_network"),)),
    Format("dino", "DINO full checkpoint (teacher/student)", "backbone.", "DINO", key="teacher",
           encoder="teacher (what DINO evaluates)", others=(("student", "--key student"),)),
    Format("vissl", "VISSL (trunk of classy_state_dict; heads dropped)", "_feature_blocks.",
           "VISSL", key="classy_state_dict.base_model.model.trunk"),
    Format("pixpro", "PixPro-style", "encoder.", "PIXPRO",
           encoder="online encoder (what PixPro evaluates)",
           others=(("key encoder", "--prefix encoder_k."),)),
    Format("backbone", "backbone.-prefixed (mmselfsup, solo-learn, ...)", "backbone.",
           "BACKBONE"),
    Format("sequential", "encoder = nn.Sequential(ResNet children) (SimCLR re-implementations)",
           "encoder.", "SEQUENTIAL", renames=SEQUENTIAL_RESNET),
    Format("torchvision", "torchvision ResNet / timm / this project's supervised baseline / "
           "SwAV (bare keys)", "", "torchvision"),
]
FORMATS_BY_NAME = {f.name: f for f in FORMATS}


def custom_format(ckpt, key=None, prefix=None):
    """The layout the user named with --key and/or --prefix (the other found as usual)."""
    if prefix is None:  # where the ResNet starts in the sub-dict, as for a plain checkpoint
        sd = sub_dict(ckpt, key) if key else default_state_dict(ckpt)
        found = next((f for f in FORMATS if not f.key and isinstance(sd, dict)
                      and f.matches(strip_module(sd))), None)
        prefix = found.prefix if found else ""
    where = " ".join(p for p in (key and f"--key {key}", f"--prefix '{prefix}'") if p)
    fmt = Format("custom", f"the layout given ({where})", prefix, "CUSTOM", key=key,
                 encoder=f"the weights at {where}")
    sequential = Format("custom", f"the layout given ({where}; nn.Sequential children)", prefix,
                        "CUSTOM", key=key, encoder=fmt.encoder, renames=SEQUENTIAL_RESNET)
    if fmt.locate(ckpt) is None and sequential.locate(ckpt) is not None:
        return sequential
    return fmt


def detect(ckpt):
    """(format, its state dict) of the first layout found in a loaded checkpoint, or None."""
    for fmt in FORMATS:
        sd = fmt.locate(ckpt)
        if sd is not None:
            return fmt, sd
    return None
