"""Model pieces of the MoCo transfer protocol, registered with detectron2.

Importing this module registers them; ``transfer.config.get_cfg`` imports it, so training,
evaluation and inference with a saved config all see the same registry.

- ``Res5ROIHeadsExtraNorm``: the C4 box head (res5 + pooling) with an extra norm after res5.
- ``build_resnet_dc5_backbone``: R50-dilated-C5 of the paper's VOC Table 2a: res5 with
  dilation 2 and stride 1, followed by a 3x3 conv with norm reducing to 512 channels.
"""
import torch.nn.functional as F

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.roi_heads import Res5ROIHeads
import fvcore.nn.weight_init as weight_init


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with one more norm layer (cfg.MODEL.RESNETS.NORM) after the res5 stage.

    The backbone's last norm is followed by the residual add and ReLU, so res5's output is not
    normalised; fine-tuning from self-supervised features is more stable with this extra norm.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


class DilatedC5Backbone(Backbone):
    """ResNet whose res5 is dilated, then conv3x3(2048 -> MODEL.DC5.OUT_CHANNELS) + norm + ReLU."""

    def __init__(self, resnet, out_channels, norm):
        super().__init__()
        self.bottom_up = resnet
        in_channels = resnet.output_shape()["res5"].channels
        self.reduce = Conv2d(in_channels, out_channels, kernel_size=3, padding=1,
                             bias=not norm, norm=get_norm(norm, out_channels))
        weight_init.c2_msra_fill(self.reduce)
        self._stride = resnet.output_shape()["res5"].stride
        self._out_channels = out_channels

    def forward(self, x):
        res5 = self.bottom_up(x)["res5"]
        return {"dc5": F.relu(self.reduce(res5))}

    def output_shape(self):
        return {"dc5": ShapeSpec(channels=self._out_channels, stride=self._stride)}


@BACKBONE_REGISTRY.register()
def build_resnet_dc5_backbone(cfg, input_shape):
    if cfg.MODEL.RESNETS.RES5_DILATION != 2:
        raise ValueError("the dilated-C5 backbone needs MODEL.RESNETS.RES5_DILATION: 2")
    resnet = build_resnet_backbone(cfg, input_shape)
    return DilatedC5Backbone(resnet, cfg.MODEL.DC5.OUT_CHANNELS, cfg.MODEL.DC5.NORM)
