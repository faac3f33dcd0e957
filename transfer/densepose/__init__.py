"""DensePose R-CNN (the paper's "legacy" s1x head on R50-FPN), carried by the harness.

detectron2's DensePose project is not on PyPI and not in the detectron2 this project installs;
this package implements the published method on detectron2's public APIs. Importing it
registers its config keys' defaults (``config``), datasets and mapper (``data``), ROI heads
(``head``) and evaluator (``evaluation``) with the harness's registries:

- ``structures``: DensePose-COCO annotations (points + 14 part masks in the box's 256 frame)
- ``data``: dataset registration and the mapper that keeps points/masks with the box
- ``head``: the 8-conv head, the deconvolution predictor, the losses, ``DensePoseROIHeads``
- ``gps``: geodesic point similarity on a body surface (SMPL files or a test mesh)
- ``evaluation``: compact IUV results and the evaluator (box AP, mask AP, GPS-based AP)
- ``fixture``: a generated DensePose-COCO dataset in the official format (tests, smoke runs)
"""
from transfer.densepose import config, data, evaluation, head  # noqa: F401  (registrations)
