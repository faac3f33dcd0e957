"""The paper rows of the results tables (results/paper_numbers.py) against the numbers the
reference file prints (../shared/reference/PROTOCOL.md, section 5), in both directions."""
import os
import re

import pytest

from results.paper_numbers import PAPER
from tests.conftest import ROOT

PROTOCOL = os.path.abspath(os.path.join(ROOT, "..", "shared", "reference", "PROTOCOL.md"))
HAVE_PROTOCOL = os.path.isfile(PROTOCOL)
requires_protocol = pytest.mark.skipif(
    not HAVE_PROTOCOL,
    reason=f"needs the reference file {PROTOCOL} (../shared/reference beside the checkout)")

BB = ["bbox/AP", "bbox/AP50", "bbox/AP75"]
MK = ["segm/AP", "segm/AP50", "segm/AP75"]
# PROTOCOL.md section 5: the line that opens each block -> the columns its numbers fill, in the
# order printed, as (task, metric). Blocks whose numbers carry a unit (the FPN 1x line) say
# which column each unit is.
BLOCKS = {
    "VOC C4 24k": [("voc_frcnn_c4_24k", m) for m in ("bbox/AP50", "bbox/AP", "bbox/AP75")],
    "VOC07-only C4 9k": [("voc07_frcnn_c4_9k", m) for m in ("bbox/AP50", "bbox/AP", "bbox/AP75")],
    "COCO FPN 2x": [("coco_mask_fpn_2x", m) for m in BB + MK],
    "COCO FPN 1x": {"APbb": ("coco_mask_fpn_1x", "bbox/AP"),
                    "APmk": ("coco_mask_fpn_1x", "segm/AP")},
    "COCO C4 2x": [("coco_mask_c4_2x", m) for m in BB + MK],
    "- COCO keypoints": [("coco_kp_fpn_2x", m)
                         for m in ("keypoints/AP", "keypoints/AP50", "keypoints/AP75")],
    "- COCO DensePose": [("coco_densepose_fpn_s1x", m)
                         for m in ("densepose/AP", "densepose/AP50", "densepose/AP75")],
    "- LVIS v0.5": [("lvis_mask_fpn_2x", m) for m in MK],
    "- Cityscapes instance": [("cityscapes_mask_fpn_24k", m) for m in ("segm/AP", "segm/AP50")],
    "- Semantic segmentation": [("cityscapes_semseg_fcn_90k", "sem_seg/IoU"),
                                ("voc_semseg_fcn_30k", "sem_seg/mIoU")],
}
NUMBER = re.compile(r"\d+\.\d+")


def weights_of(label):
    """The weights a row label names, in the file's and in the module's wording alike."""
    for key, name in (("random", "random"), ("supervised", "supervised"), ("IG-1B", "MoCo IG-1B"),
                      ("200ep", "MoCo v2 200ep"), ("800ep", "MoCo v2 800ep"), ("MoCo", "MoCo")):
        if key in label:
            return name
    raise ValueError(f"row label names no known weights: {label!r}")


def section5(text):
    m = re.search(r"^## 5\..*?$(.*?)^## 6\.", text, flags=re.S | re.M)
    assert m, "PROTOCOL.md has no section 5 followed by section 6"
    return m.group(1)


def parse_protocol(text):
    """{(task, weights, metric): (value or None, unverified)} for every number section 5 prints
    (None for a '-'), and the numbers printed in the blocks' headers (e.g. "v0.5")."""
    lines = section5(text).splitlines()
    starts = [(i, h) for i, line in enumerate(lines) for h in BLOCKS if line.startswith(h)]
    assert sorted(h for _, h in starts) == sorted(BLOCKS), "a block of section 5 moved or is gone"
    found, header_numbers, in_blocks = {}, 0, set()
    for i, header in starts:
        end = next(j for j in range(i, len(lines)) if lines[j].rstrip().endswith("."))
        in_blocks.update(range(i, end + 1))
        block = " ".join(lines[i:end + 1])  # a block runs to the line that closes with "."
        colon = block.index(":")
        header_numbers += len(NUMBER.findall(block[:colon]))
        columns = BLOCKS[header]
        for entry in block[colon + 1:].rstrip().rstrip(".").split(";"):
            entry = " ".join(entry.split())
            first = re.search(r"\d+\.\d+|-(?= ?[/|])", entry)
            label, tokens = entry[:first.start()].strip(), re.split(r"[/|]", entry[first.start():])
            if not isinstance(columns, dict):
                assert len(tokens) == len(columns), f"{entry!r}: not {len(columns)} numbers"
            for pos, token in enumerate(t.strip() for t in tokens):
                number = NUMBER.match(token)
                assert number or token == "-", f"unreadable number {token!r} in {entry!r}"
                task, metric = (columns[token.split()[1]] if isinstance(columns, dict)
                                else columns[pos])
                key = (task, weights_of(label), metric)
                assert key not in found, f"{key} printed twice"
                found[key] = (float(number.group()) if number else None,
                              "(unverified)" in token)
    # outside the blocks, numbers stand only in worked examples ("e.g. 55.9 (+2.4)")
    stray = [line for j, line in enumerate(lines)
             if j not in in_blocks and NUMBER.search(line) and "e.g." not in line]
    assert not stray, f"section 5 lines with numbers in no known block: {stray}"
    return found, header_numbers, sum(len(NUMBER.findall(lines[j])) for j in in_blocks)


def module_rows():
    rows = {}
    for task, labelled in PAPER.items():
        for label, values in labelled.items():
            for metric, value in values.items():
                key = (task, weights_of(label), metric)
                assert key not in rows, f"{key} in two rows of PAPER"
                rows[key] = (value, "(unverified)" in label)
    return rows


@requires_protocol
def test_paper_rows_equal_protocol_section5():
    with open(PROTOCOL) as f:
        text = f.read()
    printed, header_numbers, block_numbers = parse_protocol(text)
    module = module_rows()
    # every number (and '-') the file prints is in the module, with its unverified mark ...
    missing = {k: v for k, v in printed.items() if module.get(k) != v}
    assert not missing, f"PROTOCOL.md section 5 prints these, results/paper_numbers.py " \
                        f"has {[module.get(k) for k in missing]}: {missing}"
    # ... and every module number is printed in the file
    extra = {k: v for k, v in module.items() if k not in printed}
    assert not extra, f"results/paper_numbers.py has numbers PROTOCOL.md does not print: {extra}"
    # no number of the section was left unread
    numbers = sum(v is not None for v, _ in printed.values())
    assert numbers + header_numbers == block_numbers


def test_paper_metrics_are_columns_of_their_task():
    """A paper number shows in a table only if its metric is one of the task's METRICS."""
    from transfer.config import load_task_config

    for task, labelled in PAPER.items():
        metrics = set(load_task_config(task).MOCO_TRANSFER.METRICS)
        for label, values in labelled.items():
            assert set(values) <= metrics, (task, label, set(values) - metrics)
