"""Transfer of pretrained ResNets to detection and segmentation, on detectron2."""
from .d2 import ensure_detectron2

try:
    ensure_detectron2()
except ImportError:  # detectron2 not installed yet: `make setup` (install_detectron2) runs first
    pass
