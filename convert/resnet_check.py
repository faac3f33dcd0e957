"""Is a dict of torchvision-named tensors a complete ResNet backbone, and of which depth?"""
import functools
import re

import torchvision

# torchvision constructors whose stem + layer1..4 this project accepts as backbones.
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "wide_resnet50_2", "wide_resnet101_2")


class BackboneMismatch(ValueError):
    pass


@functools.lru_cache(maxsize=None)
def expected_shapes(arch):
    """{key: shape} of the torchvision ResNet's backbone (no fc), built on the meta device."""
    import torch

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _compare(backbone, arch):
    exp = expected_shapes(arch)
    have = {k: tuple(v.shape) for k, v in backbone.items()}
    # num_batches_tracked is optional (some tools never save it); everything else is required
    missing = sorted(k for k in exp if k not in have and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in have if k not in exp)
    wrong = sorted(f"{k}: {have[k]} vs {exp[k]}" for k in have if k in exp and have[k] != exp[k])
    return missing, unexpected, wrong


def identify(backbone, claimed_arch=None):
    """Return the arch name the backbone is a complete instance of, or raise BackboneMismatch.

    If the checkpoint claims an arch (its ``arch`` field), the backbone must be exactly that.
    """
    candidates = [claimed_arch] if claimed_arch in ARCHS else list(ARCHS)
    best = None
    for arch in candidates:
        missing, unexpected, wrong = _compare(backbone, arch)
        if not (missing or unexpected or wrong):
            return arch
        score = len(missing) + len(unexpected) + len(wrong)
        if best is None or score < best[0]:
            best = (score, arch, missing, unexpected, wrong)
    _, arch, missing, unexpected, wrong = best
    n_exp = len(expected_shapes(arch))
    lines = [
        f"found {len(backbone)} backbone tensors, which is not a complete {arch} "
        f"(expected {n_exp} with num_batches_tracked, "
        f"{sum(not k.endswith('num_batches_tracked') for k in expected_shapes(arch))} without)"
        + (f"; the checkpoint claims arch '{claimed_arch}'" if claimed_arch else "")
    ]
    for title, items in (("missing", missing), ("left over (unexpected)", unexpected),
                         ("wrong shape (found vs expected)", wrong)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            lines.append(f"  {title}: {shown}")
    raise BackboneMismatch("\n".join(lines))


def detectron2_resnet_config(arch):
    """The detectron2 config keys a backbone of this arch needs."""
    depth = int(re.search(r"resnet(\d+)", arch).group(1))
    cfg = {"MODEL.RESNETS.DEPTH": depth}
    if depth in (18, 34):
        cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
    if arch.startswith("wide_"):
        cfg["MODEL.RESNETS.WIDTH_PER_GROUP"] = 128
    return cfg
