"""Transfer of pretrained ResNets to detection and segmentation, on detectron2."""
