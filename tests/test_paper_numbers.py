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

    from results.paper_numbers import paper_rows

    for task in PAPER:
        metrics = set(load_task_config(task).MOCO_TRANSFER.METRICS)
        for label, values in paper_rows(task).items():
            assert set(values) <= metrics, (task, label, set(values) - metrics)


# ---------------------------------------------------------------- section 7
def section7(text):
    m = re.search(r"^## 7\.[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, "PROTOCOL.md has no section 7"
    return " ".join(m.group(1).split())


def parse_mochi_rows(text):
    """{(epochs, method, setting, top-1, voc)} from the 'ImageNet-1k linear top-1 and VOC 2007
    detection' block: rows under '100 epochs:' / '200 epochs:', and the supervised row."""
    marks = [(m.start(), int(m.group(1))) for m in re.finditer(r"(\d+) epochs:", text)]
    pm = r"(\d+\.\d) ± (\d+\.\d)"
    rows = set()
    for m in re.finditer(r"(MoCo-v2 \(reproduced\)|MoCHi \((\d+), (\d+), (\d+)\)) (\d+\.\d) \| "
                         + " / ".join([pm] * 3), text):
        epochs = max((e for pos, e in marks if pos < m.start()), default=None)
        if epochs is None or "ImageNet-1k linear top-1 and VOC" not in text[:m.start()]:
            continue
        method = "MoCHi" if m.group(2) else m.group(1)
        setting = tuple(int(m.group(i)) for i in (2, 3, 4)) if m.group(2) else None
        v = [float(x) for x in m.groups()[5:]]
        rows.add((epochs, method, setting, float(m.group(5)),
                  tuple((v[i], v[i + 1]) for i in (0, 2, 4))))
    sup = re.search(r"Supervised (\d+\.\d) \| (\d+\.\d) / (\d+\.\d) / (\d+\.\d)", text)
    rows.add((None, "Supervised", None, float(sup.group(1)),
              tuple(float(sup.group(i)) for i in (2, 3, 4))))
    return rows


def parse_entries(block):
    """'name 73.4; name 78.0 ± 0.2; + name 79.0 ± 0.4' -> {name: value or (mean, std)}."""
    out = {}
    for entry in block.split(";"):
        m = re.fullmatch(r"\s*\+?\s*(.*?) (\d+\.\d)(?: ± (\d+\.\d))?\s*\.?\s*", entry)
        assert m, f"unreadable entry {entry!r}"
        out[m.group(1)] = (float(m.group(2)), float(m.group(3))) if m.group(3) else \
            float(m.group(2))
    return out


@requires_protocol
def test_section7_numbers_are_the_modules_in_both_directions():
    from pretrain import memory_bank, mochi
    from results.paper_numbers import (LINEAR_TOP1, MOCHI_IN1K_VOC, PRETRAINING_COST,
                                       paper_rows)

    with open(PROTOCOL) as f:
        text = section7(f.read())
    # MoCHi's ImageNet-1k top-1 and VOC rows, every one, exactly
    assert parse_mochi_rows(text) == set(MOCHI_IN1K_VOC)
    voc = paper_rows("voc_frcnn_c4_24k")
    for epochs, method, setting, _, values in MOCHI_IN1K_VOC:
        if epochs:  # the VOC table shows them with their epochs and (N, s, s')
            label = next(k for k in voc if k.startswith("paper (MoCHi)") and
                         k.endswith(f"{epochs}ep") and method in k and
                         (setting is None or str(setting) in k))
            assert tuple(voc[label][m] for m in VOC_ORDER) == values
    # ImageNet-100, with and without the class oracle
    in100 = re.search(r"ImageNet-100, 200 epochs, linear top-1 \(mean ± std\): (.*?)\. With a "
                      r"class oracle \(false negatives removed\): (.*?)\. -", text)
    assert parse_entries(in100.group(1)) == LINEAR_TOP1["ImageNet-100, 200ep (MoCHi paper)"]
    assert parse_entries(in100.group(2)) == next(v for k, v in LINEAR_TOP1.items()
                                                 if "class oracle" in k)
    # the momentum ablation
    abl = re.search(r"Momentum ablation \(ResNet-50, K = 4096, linear top-1\): m = 0 fails to "
                    r"train; (.*?)\. -", text).group(1)
    printed = {"m=0": None, **{f"m={a}": float(b) for a, b in
                               (e.strip().split(": ") for e in abl.split(";"))}}
    assert printed == LINEAR_TOP1["ImageNet-1k, R50, MoCo momentum ablation, K=4096"]
    # the cost table
    cost = re.findall(r"(MoCo|end-to-end), batch (\d+): (\d+\.\d) GB[^,;]*(?: \([^)]*\))?, "
                      r"(\d+ h|n/a)", text)
    assert len(cost) == 3
    for name, batch, gb, hours in cost:
        entry = next(v for k, v in PRETRAINING_COST.items()
                     if k.startswith(f"{name}, batch {batch}"))
        assert entry["gb_per_gpu"] == float(gb)
        assert entry["hours"] == (None if hours == "n/a" else int(hours.split()[0]))
    # every other number: in the module's data, or a setting the code holds (checked there),
    # or a citation / recipe value of the mechanisms' text
    module = " ".join(repr(x) for x in (MOCHI_IN1K_VOC, LINEAR_TOP1, PRETRAINING_COST))
    held = set(re.findall(r"\d+(?:\.\d+)?", module))
    in_code = {"0.5": (memory_bank.BANK_MOMENTUM, mochi.QUERY_WEIGHT_MAX),
               "10": (mochi.DEFAULT_WARMUP_EPOCHS,)}
    for number, values in in_code.items():
        assert all(float(v) == float(number) for v in values)
    derived = {"2.6": round(60.6 - 58.0, 1)}  # "2.6 below MoCo's 60.6%"
    assert derived["2.6"] == 2.6
    # the paper's sections (3.2, 4.2.1), figures (2/3), citation [61], years, VOC 2007, AP75,
    # GPUs and batch of the 8x V100-32GB machine, the 128-d entries, the uniform ranges'
    # bounds (0, 1), IG-1B's recipe (lr 0.12, every 62.5k iterations, 1.25M, 64 GPUs)
    recipe = {"3.2", "4.2", "1", "2", "3", "61", "2018", "2020", "2007", "75", "8", "32", "1024",
              "16", "128", "0", "0.12", "62.5", "1.25", "64"}
    left = set(re.findall(r"\d+(?:\.\d+)?", text)) - held - set(in_code) - set(derived) - recipe
    assert not left, f"section 7 numbers in no structure of results/paper_numbers.py: {left}"


VOC_ORDER = ("bbox/AP50", "bbox/AP", "bbox/AP75")
