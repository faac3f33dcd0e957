"""Stage 1: MoCo v1/v2 pretraining (``main_moco.py``, ``builder.py``) and the other contrastive
mechanisms on the same stack (``mechanisms.py``: end-to-end, memory bank, MoCHi), the
supervised baseline (``main_supervised.py``), linear classification (``main_lincls.py``), kNN
monitoring, data loading and the embedded synthetic data (``synthetic.py``); SLURM submission
(``submit.py``). Pretraining's augmentation: the recipes (``recipe.py``), the PIL path
(``loader.py``), the split path's CPU part (``views.py``) and device part (``augment.py``), and
how they feed the model (``feed.py``).

No detectron2 here; imports only ``convert`` (shared file helpers).
"""