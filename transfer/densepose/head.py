"""DensePose R-CNN head of the paper's time ("legacy" s1x) and its losses.

Head: NUM_STACKED_CONVS 3x3 convs (512 channels, ReLU) on 14x14 ROI features. Predictor: one
4x4 stride-2 deconvolution per output (coarse segmentation 15 = background + 14 parts, fine
segmentation 25 = background + 24 charts, U and V per chart), then bilinear x2 -> 56x56.
Losses, for proposals with IoU > 0.7 to an annotated person:
    S  cross-entropy of the coarse segmentation against the part masks, resampled to the
       proposal's 56x56 grid                                     x INDEX_WEIGHTS (2.0)
    I  cross-entropy of the fine segmentation at the annotated points   x PART_WEIGHTS (0.3)
    U, V  smooth-L1 (summed over points) of the annotated chart's U/V    x POINT_REGRESSION (0.1)
Predictions at points are bilinear interpolations of the 56x56 maps.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ConvTranspose2d, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.registry import Registry

from transfer.densepose.structures import FRAME

ROI_DENSEPOSE_HEAD_REGISTRY = Registry("ROI_DENSEPOSE_HEAD")
ROI_DENSEPOSE_HEAD_REGISTRY.__doc__ = "DensePose ROI heads: pooled features -> 56x56 maps."


class DensePoseOutput:
    """Per-ROI 56x56 logits/maps, indexable like an Instances field."""

    FIELDS = ("coarse_segm", "fine_segm", "u", "v")

    def __init__(self, coarse_segm, fine_segm, u, v):
        self.coarse_segm, self.fine_segm, self.u, self.v = coarse_segm, fine_segm, u, v

    def __len__(self):
        return self.coarse_segm.shape[0]

    def __getitem__(self, item):
        return DensePoseOutput(*(getattr(self, f)[item] for f in self.FIELDS))

    def to(self, device):
        return DensePoseOutput(*(getattr(self, f).to(device) for f in self.FIELDS))


@ROI_DENSEPOSE_HEAD_REGISTRY.register()
class DensePoseV1ConvXHead(nn.Module):
    """The 8-conv head and the deconvolution predictor of DensePose R-CNN."""

    def __init__(self, cfg, in_channels):
        super().__init__()
        h = cfg.MODEL.ROI_DENSEPOSE_HEAD
        dim, k = h.CONV_HEAD_DIM, h.CONV_HEAD_KERNEL
        convs = []
        for i in range(h.NUM_STACKED_CONVS):
            convs.append(Conv2d(in_channels if i == 0 else dim, dim, k, padding=k // 2,
                                activation=F.relu))
            self.add_module(f"body_conv_fcn{i + 1}", convs[-1])
        self.convs = convs
        dk = h.DECONV_KERNEL
        channels = {"coarse_segm": h.NUM_COARSE_SEGM_CHANNELS,
                    "fine_segm": h.NUM_PATCHES + 1, "u": h.NUM_PATCHES + 1,
                    "v": h.NUM_PATCHES + 1}
        self.predictors = nn.ModuleDict({
            name: ConvTranspose2d(dim, c, dk, stride=2, padding=dk // 2 - 1)
            for name, c in channels.items()})
        self.up_scale = h.UP_SCALE
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        out = {}
        for name in DensePoseOutput.FIELDS:
            y = self.predictors[name](x)
            out[name] = F.interpolate(y, scale_factor=self.up_scale, mode="bilinear",
                                      align_corners=False)
        return DensePoseOutput(**out)


def build_densepose_head(cfg, in_channels):
    return ROI_DENSEPOSE_HEAD_REGISTRY.get(cfg.MODEL.ROI_DENSEPOSE_HEAD.NAME)(cfg, in_channels)


# ---------------------------------------------------------------- losses
def bilinear_at(maps, roi, fx, fy):
    """Values of maps[roi, :, fy, fx] (N, C, S, S) at fractional pixel positions, bilinearly
    interpolated (pixel centres at integer positions, border replicated) -> (P, C)."""
    size = maps.shape[-1]
    fx = fx.clamp(0, size - 1)
    fy = fy.clamp(0, size - 1)
    x0, y0 = fx.floor().long(), fy.floor().long()
    x1, y1 = (x0 + 1).clamp(max=size - 1), (y0 + 1).clamp(max=size - 1)
    wx, wy = (fx - x0).unsqueeze(1), (fy - y0).unsqueeze(1)

    def at(yy, xx):
        return maps[roi, :, yy, xx]

    return (at(y0, x0) * (1 - wx) * (1 - wy) + at(y0, x1) * wx * (1 - wy)
            + at(y1, x0) * (1 - wx) * wy + at(y1, x1) * wx * wy)


def densepose_targets(proposal_boxes, gt_boxes, gt_densepose, size):
    """Targets on each proposal's size x size grid.

    Returns (segm (N, S, S) long, roi (P,), fx (P,), fy (P,), i (P,), u (P,), v (P,)): the
    part labels of the masks sampled (nearest) at the grid's pixel centres, and the annotated
    points that fall inside their proposal, in the grid's pixel coordinates."""
    device = proposal_boxes.device
    n = proposal_boxes.shape[0]
    pe, pg = proposal_boxes, gt_boxes
    we = (pe[:, 2] - pe[:, 0]).clamp(min=1e-6)
    he = (pe[:, 3] - pe[:, 1]).clamp(min=1e-6)
    wg = (pg[:, 2] - pg[:, 0]).clamp(min=1e-6)
    hg = (pg[:, 3] - pg[:, 1]).clamp(min=1e-6)
    # masks: grid pixel centres -> image -> gt box frame, nearest label, outside = background
    centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    gx = ((pe[:, :1] + centres[None] * we[:, None]) - pg[:, :1]) / wg[:, None] * FRAME
    gy = ((pe[:, 1:2] + centres[None] * he[:, None]) - pg[:, 1:2]) / hg[:, None] * FRAME
    ix, iy = gx.floor().long(), gy.floor().long()
    okx, oky = (ix >= 0) & (ix < FRAME), (iy >= 0) & (iy < FRAME)
    segm = torch.stack([d.segm.to(device) for d in gt_densepose]).long()
    rows = torch.arange(n, device=device)[:, None, None]
    last = int(FRAME) - 1
    segm = segm[rows, iy.clamp(0, last)[:, :, None], ix.clamp(0, last)[:, None, :]]
    segm = segm * (oky[:, :, None] & okx[:, None, :])
    # points: box frame -> image -> proposal grid
    rois, fxs, fys, iis, us, vs = [], [], [], [], [], []
    for r, d in enumerate(gt_densepose):
        px = pg[r, 0] + d.x.to(device) / FRAME * wg[r]
        py = pg[r, 1] + d.y.to(device) / FRAME * hg[r]
        nx, ny = (px - pe[r, 0]) / we[r], (py - pe[r, 1]) / he[r]
        inside = (nx >= 0) & (nx < 1) & (ny >= 0) & (ny < 1) & (d.i.to(device) > 0)
        rois.append(torch.full((int(inside.sum()),), r, dtype=torch.long, device=device))
        fxs.append(nx[inside] * size - 0.5)
        fys.append(ny[inside] * size - 0.5)
        iis.append(d.i.to(device)[inside])
        us.append(d.u.to(device)[inside])
        vs.append(d.v.to(device)[inside])
    return (segm, cat(rois), cat(fxs), cat(fys), cat(iis), cat(us), cat(vs))


def densepose_losses(out, proposal_boxes, gt_boxes, gt_densepose, w_index, w_part, w_points):
    zero = sum(getattr(out, f).sum() for f in DensePoseOutput.FIELDS) * 0.0
    names = ("loss_densepose_S", "loss_densepose_I", "loss_densepose_U", "loss_densepose_V")
    if len(out) == 0:
        return {k: zero for k in names}
    size = out.coarse_segm.shape[-1]
    segm, roi, fx, fy, i, u, v = densepose_targets(proposal_boxes, gt_boxes, gt_densepose, size)
    losses = {"loss_densepose_S": F.cross_entropy(out.coarse_segm, segm) * w_index}
    if roi.numel() == 0:
        losses.update({k: zero for k in names[1:]})
        return losses
    fine = bilinear_at(out.fine_segm, roi, fx, fy)
    u_est = bilinear_at(out.u, roi, fx, fy).gather(1, i[:, None]).squeeze(1)
    v_est = bilinear_at(out.v, roi, fx, fy).gather(1, i[:, None]).squeeze(1)
    losses["loss_densepose_I"] = F.cross_entropy(fine, i) * w_part
    losses["loss_densepose_U"] = F.smooth_l1_loss(u_est, u, reduction="sum") * w_points
    losses["loss_densepose_V"] = F.smooth_l1_loss(v_est, v, reduction="sum") * w_points
    return losses


# ---------------------------------------------------------------- ROI heads
def densepose_proposals(proposals, num_classes, fg_iou):
    """Per image (one possibly empty Instances each), the foreground proposals that the
    DensePose head trains on: matched to an annotated person with IoU strictly above fg_iou."""
    fg, _ = select_foreground_proposals(proposals, num_classes)
    picked = []
    for p in fg:
        if len(p) and p.has("gt_densepose"):
            iou = matched_pairwise_iou(p.proposal_boxes, p.gt_boxes)
            p = p[p.gt_densepose.has_data().to(iou.device) & (iou > fg_iou)]
        else:
            p = p[:0]
        picked.append(p)
    return picked


@ROI_HEADS_REGISTRY.register()
class DensePoseROIHeads(StandardROIHeads):
    """StandardROIHeads (boxes; masks/keypoints if enabled) plus the DensePose branch."""

    @configurable
    def __init__(self, *, densepose_in_features=None, densepose_pooler=None,
                 densepose_head=None, densepose_loss_weights=(2.0, 0.3, 0.1),
                 densepose_fg_iou=0.7, **kwargs):
        super().__init__(**kwargs)
        self.densepose_on = densepose_in_features is not None
        if self.densepose_on:
            self.densepose_in_features = densepose_in_features
            self.densepose_pooler = densepose_pooler
            self.densepose_head = densepose_head
            self.densepose_loss_weights = tuple(densepose_loss_weights)
            self.densepose_fg_iou = densepose_fg_iou

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        if not cfg.MODEL.DENSEPOSE_ON:
            return ret
        h = cfg.MODEL.ROI_DENSEPOSE_HEAD
        if h.DECODER_ON:
            raise ValueError("MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON: the DensePose decoder of "
                             "later configs is not implemented; the legacy s1x head has none "
                             "(set it to False)")
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        channels = {input_shape[f].channels for f in in_features}
        assert len(channels) == 1, channels
        ret.update(
            densepose_in_features=in_features,
            densepose_pooler=ROIPooler(
                output_size=h.POOLER_RESOLUTION,
                scales=tuple(1.0 / input_shape[f].stride for f in in_features),
                sampling_ratio=h.POOLER_SAMPLING_RATIO, pooler_type=h.POOLER_TYPE),
            densepose_head=build_densepose_head(cfg, channels.pop()),
            densepose_loss_weights=(h.INDEX_WEIGHTS, h.PART_WEIGHTS,
                                    h.POINT_REGRESSION_WEIGHTS),
            densepose_fg_iou=h.FG_IOU_THRESHOLD)
        return ret

    def forward(self, images, features, proposals, targets=None):
        instances, losses = super().forward(images, features, proposals, targets)
        if self.training and self.densepose_on:
            losses.update(self._forward_densepose(features, instances))
        return instances, losses

    def forward_with_given_boxes(self, features, instances):
        instances = super().forward_with_given_boxes(features, instances)
        return self._forward_densepose(features, instances) if self.densepose_on else instances

    def _forward_densepose(self, features, instances):
        feats = [features[f] for f in self.densepose_in_features]
        if self.training:
            # one (possibly empty) box list per image: the pooler pairs them with the batch
            picked = densepose_proposals(instances, self.num_classes, self.densepose_fg_iou)
            boxes = [p.proposal_boxes for p in picked]
            out = self.densepose_head(self.densepose_pooler(feats, boxes))
            if len(out) == 0:  # no annotated person matched: zero losses reaching the head
                return densepose_losses(out, None, None, None, *self.densepose_loss_weights)
            return densepose_losses(out, cat([b.tensor for b in boxes]),
                                    cat([p.gt_boxes.tensor for p in picked]),
                                    [d for p in picked if p.has("gt_densepose")
                                     for d in p.gt_densepose.items],
                                    *self.densepose_loss_weights)
        boxes = [i.pred_boxes for i in instances]
        out = self.densepose_head(self.densepose_pooler(feats, boxes))
        start = 0
        for inst in instances:
            inst.pred_densepose = out[start:start + len(inst)]
            start += len(inst)
        return instances
