"""Stage 1: MoCo v1/v2 pretraining (``main_moco.py``, ``builder.py``) and the other contrastive
mechanisms on the same stack (``mechanisms.py``: end-to-end, memory bank, MoCHi), the
supervised baseline (``main_supervised.py``), linear classification (``main_lincls.py``), kNN
monitoring, data loading and the embedded synthetic data (``synthetic.py``); SLURM submission
(``submit.py``).

No detectron2 here; imports only ``convert`` (shared file helpers).
"""
import os

# OpenMP threads that wait passively (before torch loads OpenMP): see transfer/speed.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
