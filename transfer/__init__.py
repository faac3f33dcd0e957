"""Stage 3: fine-tuning and evaluation of one transfer run on detectron2.

``train_net.py`` is the entry point; ``configs/`` the tasks; ``config.py`` resolves a run's
config; ``weights.py`` and ``checkpoint.py`` own the weights; ``trainer.py``, ``sampling.py``,
``datasets.py`` and ``evaluators.py`` train and evaluate; ``run_dir.py`` is the run-directory
contract; ``speed.py`` and ``console.py`` the CPU speed defaults and the quiet console. Model
families (``modeling.py``, ``semseg.py``, ``densepose/``) register their own heads, datasets,
mappers and evaluators. ``d2.py`` stands in for detectron2's compiled ops.

Imports only ``convert`` among the other stages.
"""
import os

# OpenMP threads that wait passively (before torch loads OpenMP): on a small CPU shared with data
# workers or other jobs, spinning threads stall every op (transfer/speed.py, BENCHMARKS.md).
# An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
