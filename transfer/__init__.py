"""Stage 3: fine-tuning and evaluation of one transfer run on detectron2.

``train_net.py`` is the entry point; ``configs/`` the tasks; ``config.py`` resolves a run's
config; ``weights.py`` and ``checkpoint.py`` own the weights; ``trainer.py``, ``sampling.py``,
``datasets.py`` and ``evaluators.py`` train and evaluate; ``run_dir.py`` is the run-directory
contract; ``speed.py`` and ``console.py`` the CPU speed defaults and the quiet console. Model
families (``modeling.py``, ``semseg.py``, ``densepose/``) register their own heads, datasets,
mappers and evaluators. ``d2.py`` stands in for detectron2's compiled ops.

Imports only ``convert`` among the other stages.
"""