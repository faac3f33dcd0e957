"""MoCo pretraining, the supervised baseline and their evaluation."""
import os

# OpenMP threads that wait passively (before torch loads OpenMP): see transfer/speed.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
