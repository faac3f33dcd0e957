"""The paper's published numbers (PROTOCOL.md section 5), as labelled reference rows.

{task: {row label: {metric: value}}}; metric keys are the harness's "<group>/<metric>" names.
None marks a number the paper does not give ("-" in PROTOCOL.md). "(unverified)" marks a number
that no source prints (recalled, not read); tests/test_paper_numbers.py checks this module
against PROTOCOL.md section 5 in both directions.
"""
BB = ("bbox/AP", "bbox/AP50", "bbox/AP75")
MK = ("segm/AP", "segm/AP50", "segm/AP75")
VOC = ("bbox/AP50", "bbox/AP", "bbox/AP75")
KP = ("keypoints/AP", "keypoints/AP50", "keypoints/AP75")
DP = ("densepose/AP", "densepose/AP50", "densepose/AP75")
CS = ("segm/AP", "segm/AP50")  # Cityscapes instance: APmk, APmk50


def _row(keys, values):
    return dict(zip(keys, values))


PAPER = {
    "voc_frcnn_c4_24k": {
        "paper: random init": _row(VOC, (60.2, 33.8, 33.1)),
        "paper: supervised IN-1M": _row(VOC, (81.3, 53.5, 58.8)),
        "paper: MoCo IN-1M": _row(VOC, (81.5, 55.9, 62.6)),
        "paper: MoCo IG-1B": _row(VOC, (82.2, 57.2, 63.7)),
        "paper: MoCo v2 200ep": _row(VOC, (82.4, 57.0, 63.6)),
        "paper: MoCo v2 800ep": _row(VOC, (82.5, 57.4, 64.0)),
    },
    "voc07_frcnn_c4_9k": {
        "paper: supervised IN-1M": _row(VOC, (74.4, 42.4, 42.7)),
        "paper: MoCo IN-1M": _row(VOC, (74.9, 46.6, 50.1)),
        "paper: MoCo IG-1B": _row(VOC, (75.6, 47.6, 51.7)),
    },
    "coco_mask_fpn_2x": {
        "paper: random init": _row(BB + MK, (36.7, None, 40.0, 33.7, None, 35.9)),
        "paper: supervised IN-1M": _row(BB + MK, (40.6, 61.3, 44.4, 36.8, 58.1, 39.5)),
        "paper: MoCo IN-1M": _row(BB + MK, (40.8, 61.6, 44.7, 36.9, 58.4, 39.7)),
        "paper: MoCo IG-1B": _row(BB + MK, (41.1, 61.8, 45.1, 37.4, 59.1, 40.2)),
    },
    "coco_mask_fpn_1x": {
        "paper: supervised IN-1M (unverified)": {"bbox/AP": 38.9},
        "paper: MoCo IN-1M": {"bbox/AP": 38.5, "segm/AP": 35.1},
    },
    "coco_mask_c4_2x": {
        "paper: supervised IN-1M": _row(BB + MK, (40.0, 59.9, 43.1, 34.7, 56.5, 36.9)),
        "paper: MoCo IN-1M": _row(BB + MK, (40.7, 60.5, 44.1, 35.4, 57.3, 37.6)),
        "paper: MoCo IG-1B": _row(BB + MK, (41.1, 60.7, 44.8, 35.6, 57.4, 38.1)),
    },
    "coco_kp_fpn_2x": {
        "paper: random init": _row(KP, (65.9, 86.5, 71.7)),
        "paper: supervised IN-1M": _row(KP, (65.8, 86.9, 71.9)),
        "paper: MoCo IN-1M": _row(KP, (66.8, 87.4, 72.5)),
        "paper: MoCo IG-1B": _row(KP, (66.9, 87.8, 73.0)),
    },
    "lvis_mask_fpn_2x": {
        "paper: random init": _row(MK, (22.5, 34.8, 23.8)),
        "paper: supervised IN-1M (frozen BN)": _row(MK, (24.4, 37.8, 25.8)),
        "paper: MoCo IN-1M": _row(MK, (24.1, 37.4, 25.5)),
        "paper: MoCo IG-1B": _row(MK, (24.9, 38.2, 26.4)),
    },
    "cityscapes_mask_fpn_24k": {
        "paper: random init": _row(CS, (25.4, 51.1)),
        "paper: supervised IN-1M": _row(CS, (32.9, 59.6)),
        "paper: MoCo IN-1M": _row(CS, (32.3, 59.3)),
        "paper: MoCo IG-1B": _row(CS, (32.9, 60.3)),
    },
    "cityscapes_semseg_fcn_90k": {
        "paper: random init": {"sem_seg/IoU": 65.3},
        "paper: supervised IN-1M": {"sem_seg/IoU": 74.6},
        "paper: MoCo IN-1M": {"sem_seg/IoU": 75.3},
        "paper: MoCo IG-1B": {"sem_seg/IoU": 75.5},
    },
    "voc_semseg_fcn_30k": {
        "paper: random init": {"sem_seg/mIoU": 39.5},
        "paper: supervised IN-1M": {"sem_seg/mIoU": 74.4},
        "paper: MoCo IN-1M": {"sem_seg/mIoU": 72.5},
        "paper: MoCo IG-1B": {"sem_seg/mIoU": 73.6},
    },
    "coco_densepose_fpn_s1x": {
        "paper: random init": _row(DP, (39.4, 78.5, 35.1)),
        "paper: supervised IN-1M": _row(DP, (48.3, 85.6, 50.6)),
        "paper: MoCo IN-1M": _row(DP, (50.1, 86.8, 53.9)),
        "paper: MoCo IG-1B": _row(DP, (50.6, 87.0, 54.3)),
    },
}
