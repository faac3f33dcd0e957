"""Transfer of pretrained ResNets to detection and segmentation, on detectron2."""
import os

# OpenMP threads that wait passively (before torch loads OpenMP): on a small CPU shared with data
# workers or other jobs, spinning threads stall every op (transfer/speed.py, BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .d2 import ensure_detectron2

try:
    ensure_detectron2()
except ImportError:  # detectron2 not installed yet: `make setup` (install_detectron2) runs first
    pass
