"""The published numbers (PROTOCOL.md sections 5 and 7), as labelled reference rows.

PAPER (section 5, the MoCo paper): {task: {row label: {metric: value}}}; metric keys are the
harness's "<group>/<metric>" names. None marks a number the paper does not give ("-" in
PROTOCOL.md). "(unverified)" marks a number that no source prints (recalled, not read).
Section 7 (the other mechanisms and MoCHi): MOCHI_IN1K_VOC (MoCHi's ImageNet-1k linear top-1
and VOC rows), LINEAR_TOP1, PRETRAINING_COST; a value with a spread is (mean, std).
`paper_rows(task)` is what a results table shows for a task: PAPER's rows, then MoCHi's VOC
rows on voc_frcnn_c4_24k (the MoCo VOC protocol). tests/test_paper_numbers.py checks this module
against PROTOCOL.md sections 5 and 7 in both directions.
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


# ---------------------------------------------------------------- PROTOCOL.md section 7
# MoCHi (Kalantidis et al., NeurIPS 2020) as the seed slides print it, R50 on ImageNet-1k:
# (pretraining epochs, method, (N, s, s') or None, ImageNet-1k linear top-1, VOC 2007 detection
# with Faster R-CNN R50-C4 under the MoCo VOC protocol (AP50, AP, AP75), each (mean, std) over
# runs; the supervised row prints no std)
MOCHI_IN1K_VOC = [
    (100, "MoCo-v2 (reproduced)", None, 63.6, ((80.8, 0.2), (53.7, 0.2), (59.1, 0.3))),
    (100, "MoCHi", (256, 512, 0), 63.9, ((81.1, 0.1), (54.3, 0.3), (60.2, 0.1))),
    (100, "MoCHi", (256, 512, 256), 63.7, ((81.3, 0.1), (54.6, 0.3), (60.7, 0.8))),
    (100, "MoCHi", (128, 1024, 512), 63.4, ((81.1, 0.1), (54.7, 0.3), (60.9, 0.1))),
    (200, "MoCo-v2 (reproduced)", None, 67.9, ((82.5, 0.2), (56.8, 0.1), (63.3, 0.4))),
    (200, "MoCHi", (1024, 512, 256), 68.0, ((82.3, 0.2), (56.7, 0.2), (63.8, 0.2))),
    (200, "MoCHi", (512, 1024, 512), 67.6, ((82.7, 0.1), (57.1, 0.1), (64.1, 0.3))),
    (200, "MoCHi", (256, 512, 0), 67.7, ((82.8, 0.2), (57.3, 0.2), (64.1, 0.1))),
    (200, "MoCHi", (256, 512, 256), 67.6, ((82.6, 0.2), (57.2, 0.3), (64.2, 0.5))),
    (200, "MoCHi", (256, 2048, 2048), 67.0, ((82.5, 0.1), (57.1, 0.2), (64.4, 0.2))),
    (200, "MoCHi", (128, 1024, 512), 66.9, ((82.7, 0.2), (57.5, 0.3), (64.4, 0.4))),
    (None, "Supervised", None, 76.1, (81.3, 53.5, 58.8)),
]


def mochi_label(epochs, method, setting):
    """'MoCHi (256, 512, 0) 200ep', 'MoCo-v2 (reproduced) 100ep', 'Supervised'."""
    text = method + (f" ({', '.join(map(str, setting))})" if setting else "")
    return text + (f" {epochs}ep" if epochs else "")


# the VOC rows, beside the MoCo paper's on the same task (the supervised row is the MoCo paper's
# "supervised IN-1M" row, number for number: not repeated)
MOCHI_VOC_ROWS = {f"paper (MoCHi): {mochi_label(e, m, s)}": _row(VOC, voc)
                  for e, m, s, _, voc in MOCHI_IN1K_VOC if e}

# ImageNet linear classification top-1 (%): {evaluation: {row label: top-1 or (mean, std)}};
# None: the run failed to train
LINEAR_TOP1 = {
    "ImageNet-1k, R50 (MoCo paper; MoCo v2 note)": {
        "MoCo v1, 200ep, batch 256": 60.6,
        "memory bank, InfoNCE, K=65536 (the MoCo paper's improved re-implementation)": 58.0,
        "memory bank, NCE, K=4096 (as in Wu et al.)": 54.3,
        "SimCLR, 200ep, batch 256": 61.9,
        "SimCLR, 200ep, batch 8192": 66.6,
        "MoCo v2, 200ep, batch 256": 67.5,
        "SimCLR, 1000ep, batch 4096": 69.3,
        "MoCo v2, 800ep, batch 256": 71.1,
    },
    "ImageNet-1k, R50, MoCo momentum ablation, K=4096": {
        "m=0": None, "m=0.9": 55.2, "m=0.99": 57.8, "m=0.999": 59.0, "m=0.9999": 58.9,
    },
    "ImageNet-1k, R50 (MoCHi paper)": {mochi_label(e, m, s): top1
                                       for e, m, s, top1, _ in MOCHI_IN1K_VOC},
    "ImageNet-100, 200ep (MoCHi paper)": {
        "MoCo": 73.4, "MoCo + iMix": 74.2, "CMC": 75.7, "CMC + iMix": 75.9,
        "MoCo (reproduced)": 74.0, "MoCo-v2 (reproduced)": (78.0, 0.2),
        "MoCHi (1024, 1024, 128)": (79.0, 0.4), "MoCHi (1024, 256, 512)": (79.0, 0.4),
        "MoCHi (1024, 128, 256)": (78.9, 0.5),
    },
    "ImageNet-100, 200ep, class oracle: false negatives removed (MoCHi paper)": {
        "MoCo-v2": 81.8, "MoCHi (1024, 1024, 128)": 82.5, "supervised (cross-entropy)": 86.2,
    },
}

# What pretraining cost, as printed: GPUs, memory per GPU (GB), time
PRETRAINING_COST = {
    # the MoCo slide table "Comparison on ImageNet", 8 V100-16GB GPUs, 200 epochs
    "MoCo, batch 256": {"gpus": "8 V100-16GB", "gb_per_gpu": 5.0, "hours": 53},
    "end-to-end, batch 256": {"gpus": "8 V100-16GB", "gb_per_gpu": 7.4, "hours": 65},
    "end-to-end, batch 4096 (estimated, cannot run)": {"gpus": "8 V100-16GB",
                                                        "gb_per_gpu": 93.0, "hours": None},
    "MoCHi, R50 on ImageNet-1k": {"gpus": "4 V100", "days": (6, 7)},
    "MoCo, IG-1B": {"gpus": "64", "days": 6},  # "about 6 days"
}


def paper_rows(task):
    """{row label: {metric: value or (mean, std)}}: the published rows of `task`'s table."""
    rows = dict(PAPER.get(task, {}))
    if task == "voc_frcnn_c4_24k":
        rows.update(MOCHI_VOC_ROWS)
    return rows
