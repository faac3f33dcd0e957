"""DensePose results in compact form and their evaluation.

Each detected person is written as its box, score and an IUV image spanning the box, of
max(int(h), 1) x max(int(w), 1) pixels (uint8: chart index 0..24, U*255, V*255) stored as a
base64 PNG. The evaluator reports
    bbox/AP...     COCO box AP (pycocotools)
    segm/AP...     COCO mask AP of the predicted body (IUV foreground), when the ground truth
                   carries COCO segmentations
    densepose/AP, AP50, AP75, APm, APl        GPS-based AP (the published APdp)
    densepose_gpsm/AP, AP50, AP75, APm, APl   the same with GPSM = sqrt(GPS x body mask IoU)
The last two follow the official DensePose-COCO evaluator's conventions (DensePoseCocoEval):
point lookup, per-part geodesic normalisation (gps.py), ignore rules, the box-IoU rescue at the
last threshold, area ranges, 20 detections per image and COCO's accumulation. They need the
geodesic data (gps.py); without it, a warning says why.
"""
import base64
import contextlib
import copy
import io
import itertools
import json
import logging
import os
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import zoom

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from convert.files import write_json_atomic

from transfer.densepose.config import densepose_data_dir
from transfer.densepose.gps import gps, load_official_surface
from transfer.densepose.structures import decode_part_masks
from transfer.evaluators import register_evaluator

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- compact IUV
def iuv_size(box_xywh):
    """(rows, columns) of a detection's IUV image: the box's size cut to integers."""
    return max(int(box_xywh[3]), 1), max(int(box_xywh[2]), 1)


def box_iuv(output, box_xyxy):
    """One detection's 56x56 maps -> uint8 IUV (3, H, W) spanning its box."""
    x0, y0, x1, y1 = [float(b) for b in box_xyxy]
    size = iuv_size((x0, y0, x1 - x0, y1 - y0))

    def up(t):
        return F.interpolate(t.float(), size, mode="bilinear", align_corners=False)[0]

    fg = up(output.coarse_segm).argmax(0) > 0
    i = up(output.fine_segm).argmax(0) * fg
    u = up(output.u).gather(0, i[None])[0].clamp(0, 1) * fg
    v = up(output.v).gather(0, i[None])[0].clamp(0, 1) * fg
    return torch.stack([i.to(torch.uint8), (u * 255).round().to(torch.uint8),
                        (v * 255).round().to(torch.uint8)]).cpu().numpy()


def encode_iuv(iuv):
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(iuv.transpose(1, 2, 0))).save(buf, format="PNG")
    return {"size": list(iuv.shape[1:]), "iuv_png": base64.b64encode(buf.getvalue()).decode()}


def decode_iuv(compact):
    img = Image.open(io.BytesIO(base64.b64decode(compact["iuv_png"])))
    return np.asarray(img).transpose(2, 0, 1)


def paste_mask(mask, box_xywh, height, width):
    """RLE (height x width) of `mask` with its top-left at (int(x), int(y)), cut at the image
    and at int(x + w), int(y + h) (the official evaluator's placement)."""
    x, y, w, h = box_xywh
    canvas = np.zeros((height, width), dtype=np.uint8, order="F")
    if mask is not None:
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1 = min(int(x + w), width, int(x) + mask.shape[1])
        y1 = min(int(y + h), height, int(y) + mask.shape[0])
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = mask[y0 - int(y):y1 - int(y), x0 - int(x):x1 - int(x)] > 0
    return mask_util.encode(canvas)


def body_mask_rle(iuv, box_xywh, height, width):
    """RLE (image size, json-ready) of the predicted body: the IUV foreground at its box."""
    rle = paste_mask(iuv[0], box_xywh, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def person_mask(anno):
    """A person's body mask in its box: the union of its 14 part masks (256x256), resized to
    round(h) x round(w) (bilinear, corner-aligned), kept where > 0.5. None without masks."""
    if not anno.get("dp_masks"):
        return None
    _, _, w, h = anno["bbox"]
    mask = (decode_part_masks(anno["dp_masks"][:14]) > 0).astype(np.float64)
    mask = zoom(mask, (max(h, 1) / mask.shape[0], max(w, 1) / mask.shape[1]), order=1,
                prefilter=False)
    return mask > 0.5


# ---------------------------------------------------------------- GPS-based AP
class DensePoseCocoEval(COCOeval):
    """COCOeval with the official DensePose-COCO matching (keypoint-style parameters: maxDets
    20, areas all/medium/large, thresholds 0.50:0.05:0.95). ``mode`` "GPS" scores a
    (detection, person) pair by GPS, "GPSM" by sqrt(GPS x body mask IoU). The pair scores are
    computed once per image and kept across modes.

    People without ``dp_x`` are ignored (pair score 0, whatever ``iscrowd`` says); in an
    image without a person that counts for the area range, all detections are ignored; a
    detection unmatched at the last threshold takes the person of highest box IoU >= 0.8 not
    matched there and, with it, that person's ignore flag at every threshold."""

    BOX_RESCUE_IOU = 0.8

    def __init__(self, coco_gt, coco_dt, surface, mode="GPS"):
        super().__init__(coco_gt, coco_dt, iouType="keypoints")
        self.surface, self.mode = surface, mode
        self._pairs = {}

    def _prepare(self):
        p = self.params
        self._gts, self._dts = defaultdict(list), defaultdict(list)
        for g in self.cocoGt.loadAnns(self.cocoGt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds)):
            g["ignore"] = int("dp_x" not in g)
            self._gts[g["image_id"], g["category_id"]].append(g)
        for d in self.cocoDt.loadAnns(self.cocoDt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds)):
            self._dts[d["image_id"], d["category_id"]].append(d)
        self.evalImgs = defaultdict(list)
        self.eval = {}

    def _top_detections(self, dts, max_det):
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        return [dts[k] for k in order[:max_det]]

    # -------------------------------------------------------- pair scores
    def computeOks(self, imgId, catId):  # noqa: N802  (COCOeval calls it for "keypoints")
        key = (imgId, catId)
        if key not in self._pairs:
            self._pairs[key] = self.pair_scores(imgId, catId)
        return self._pairs[key]

    def pair_scores(self, img_id, cat_id):
        """{"gps", "mask_iou", "box_iou"}: (detections by decreasing score, up to maxDets) x
        (people in annotation order), or None without detections or people."""
        gts = self._gts[img_id, cat_id]
        dts = self._top_detections(self._dts[img_id, cat_id], self.params.maxDets[-1])
        if not gts or not dts:
            return None
        crowd = [int(g.get("iscrowd", 0)) for g in gts]
        image = self.cocoGt.imgs[img_id]
        size = (image["height"], image["width"])
        g_masks = [paste_mask(None if g["ignore"] else person_mask(g), g["bbox"], *size)
                   for g in gts]
        d_masks = [paste_mask(self._iuv(d)[0], d["bbox"], *size) for d in dts]
        scores = np.zeros((len(dts), len(gts)))
        for j, g in enumerate(gts):
            if not g["ignore"]:
                scores[:, j] = [self.pair_gps(d, g) for d in dts]
        return {"gps": scores, "mask_iou": mask_util.iou(d_masks, g_masks, crowd),
                "box_iou": mask_util.iou([d["bbox"] for d in dts], [g["bbox"] for g in gts],
                                         crowd)}

    @staticmethod
    def _iuv(det):
        if "_iuv" not in det:
            det["_iuv"] = decode_iuv(det["densepose"])
        return det["_iuv"]

    def pair_gps(self, det, gt):
        """GPS of a detection at a person's points: x = bx + dp_x * bw / 255 (y alike); the
        IUV pixel (int(y - dy), int(x - dx)) of the detection, background outside int(dw) x
        int(dh); 0 when every point is outside."""
        bx, by, bw, bh = gt["bbox"]
        dx, dy, dw, dh = det["bbox"]
        cols = (np.asarray(gt["dp_x"], np.float64) * bw / 255.0 + bx - dx).astype(np.int64)
        rows = (np.asarray(gt["dp_y"], np.float64) * bh / 255.0 + by - dy).astype(np.int64)
        inside = (cols >= 0) & (rows >= 0) & (cols < int(dw)) & (rows < int(dh))
        if not inside.any():
            return 0.0
        iuv = self._iuv(det)
        i = np.zeros(len(cols), np.int64)
        u, v = np.zeros(len(cols)), np.zeros(len(cols))
        r, c = rows[inside], cols[inside]
        i[inside] = iuv[0, r, c]
        u[inside] = iuv[1, r, c] / 255.0
        v[inside] = iuv[2, r, c] / 255.0
        return gps(self.surface, (gt["dp_I"], gt["dp_U"], gt["dp_V"]), (i, u, v))

    def _mode_scores(self, pairs):
        if self.mode == "GPS":
            return pairs["gps"]
        if self.mode == "GPSM":
            return np.sqrt(pairs["gps"] * pairs["mask_iou"])
        raise ValueError(f"unknown DensePose evaluation mode '{self.mode}' (GPS or GPSM)")

    # -------------------------------------------------------- matching
    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802  (COCOeval's name)
        gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gts and not dts:
            return None
        dts = self._top_detections(dts, maxDet)
        g_ignore = np.array([bool(g["ignore"]) or not aRng[0] <= g["area"] <= aRng[1]
                             for g in gts], dtype=bool)
        g_order = np.argsort(g_ignore, kind="mergesort")  # counted people first
        gts, g_ignore = [gts[k] for k in g_order], g_ignore[g_order]
        crowd = [int(g.get("iscrowd", 0)) for g in gts]
        thresholds = self.params.iouThrs
        n_t, n_d, n_g = len(thresholds), len(dts), len(gts)
        g_match, d_match = np.zeros((n_t, n_g)), np.zeros((n_t, n_d))
        d_ignore = np.full((n_t, n_d), bool(g_ignore.all()))  # no person counts here
        pairs = self.ious[imgId, catId]
        if pairs is not None:
            scores = self._mode_scores(pairs)[:n_d, g_order]
            for t_idx, t in enumerate(thresholds):
                for d_idx in range(n_d):
                    best, m = min(t, 1 - 1e-10), -1
                    for g_idx in range(n_g):
                        if g_match[t_idx, g_idx] and not crowd[g_idx]:
                            continue
                        if m > -1 and not g_ignore[m] and g_ignore[g_idx]:
                            break
                        s = scores[d_idx, g_idx]
                        if s < best or s == 0:
                            continue
                        best, m = s, g_idx
                    if m > -1:
                        d_ignore[t_idx, d_idx] = g_ignore[m]
                        d_match[t_idx, d_idx] = gts[m]["id"]
                        g_match[t_idx, m] = dts[d_idx]["id"]
            self._box_rescue(pairs["box_iou"][:n_d, g_order], dts, gts, g_ignore, crowd,
                             d_match, g_match, d_ignore)
        area = np.array([d["area"] for d in dts])
        outside = (area < aRng[0]) | (area > aRng[1])
        d_ignore = d_ignore | ((d_match == 0) & outside[None])
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dts], "gtIds": [g["id"] for g in gts],
                "dtMatches": d_match, "gtMatches": g_match, "dtScores": [d["score"] for d in dts],
                "gtIgnore": g_ignore, "dtIgnore": d_ignore}

    def _box_rescue(self, box_iou, dts, gts, g_ignore, crowd, d_match, g_match, d_ignore):
        """At the last threshold: an unmatched detection takes the person (not matched there;
        crowds always) of highest box IoU >= 0.8, later on ties, and that person's ignore
        flag at every threshold; an ignored person counts as matched to it there."""
        last = d_match.shape[0] - 1
        for d_idx in range(len(dts)):
            if d_match[last, d_idx]:
                continue
            best, m = self.BOX_RESCUE_IOU, -1
            for g_idx in range(len(gts)):
                if g_match[last, g_idx] and not crowd[g_idx]:
                    continue
                if box_iou[d_idx, g_idx] < best:
                    continue
                best, m = box_iou[d_idx, g_idx], g_idx
            if m > -1:
                d_ignore[:, d_idx] = g_ignore[m]
                if g_ignore[m]:
                    d_match[last, d_idx] = gts[m]["id"]
                    g_match[last, m] = dts[d_idx]["id"]


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _stats(ev, names):
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    logger.info("\n%s", out.getvalue())
    return {n: float(s * 100) if s >= 0 else float("nan") for n, s in zip(names, ev.stats)}


BOX_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
GPS_NAMES = ["AP", "AP50", "AP75", "APm", "APl"]
MODES = {"densepose": "GPS", "densepose_gpsm": "GPSM"}  # result key -> evaluation mode


def gt_coco(dataset):
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    _quiet(coco.createIndex)
    return coco


def results_coco(dataset, predictions):
    """Detections (compact form) as a COCO object: ids 1.. in list order, area = box w * h."""
    res = COCO()
    res.dataset = {"images": dataset["images"], "categories": dataset["categories"],
                   "annotations": [dict(p, id=k + 1, area=p["bbox"][2] * p["bbox"][3],
                                        iscrowd=0) for k, p in enumerate(predictions)]}
    _quiet(res.createIndex)
    return res


def evaluate_densepose(dataset, predictions, surface=None):
    """{bbox: ..., segm: ..., densepose: ..., densepose_gpsm: ...} for predictions in compact
    form against a DensePose-COCO dict (segm only when every person has a segmentation; the
    DensePose groups only with a surface)."""
    coco = gt_coco(dataset)
    results = {}
    if not predictions:
        logger.warning("no detections: every AP is 0")
        results["bbox"] = {n: 0.0 for n in BOX_NAMES}
        if surface is not None:
            results.update({k: {n: 0.0 for n in GPS_NAMES} for k in MODES})
        return results
    dets = [{k: p[k] for k in ("image_id", "category_id", "bbox", "score")} for p in predictions]
    results["bbox"] = _stats(COCOeval(coco, _quiet(coco.loadRes, dets), "bbox"), BOX_NAMES)
    if all("segmentation" in a for a in dataset["annotations"]):
        segs = [{k: p[k] for k in ("image_id", "category_id", "segmentation", "score")}
                for p in predictions]
        results["segm"] = _stats(COCOeval(coco, _quiet(coco.loadRes, segs), "segm"), BOX_NAMES)
    if surface is not None:
        ev = DensePoseCocoEval(coco, results_coco(dataset, predictions), surface)
        for key, mode in MODES.items():
            ev.mode = mode
            results[key] = _stats(ev, GPS_NAMES)
    return results


def resolve_geodesics(data_dir):
    """(surface or None, reason why not) from the DensePose data folder."""
    try:
        return load_official_surface(data_dir), ""
    except FileNotFoundError as e:
        return None, (f"{e}. GPS-based AP (densepose/AP..., densepose_gpsm/AP...) is not "
                      f"computed: put the files in DENSEPOSE.DATA (default "
                      f"$DETECTRON2_DATASETS/densepose/)")


class DensePoseEvaluator(DatasetEvaluator):
    def __init__(self, dataset_name, output_dir=None, data_dir=""):
        meta = MetadataCatalog.get(dataset_name)
        self._json_file = meta.json_file
        self._to_dataset_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        self._output_dir = output_dir
        self._data_dir = data_dir
        self._predictions = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"]  # the IUV images are made where the maps are (GPU)
            boxes = inst.pred_boxes.tensor.cpu().tolist()
            for k in range(len(inst)):
                x0, y0, x1, y1 = boxes[k]
                box = [x0, y0, x1 - x0, y1 - y0]
                iuv = box_iuv(inst.pred_densepose[k:k + 1], (x0, y0, x1, y1))
                self._predictions.append({
                    "image_id": inp["image_id"],
                    "category_id": self._to_dataset_id[int(inst.pred_classes[k])],
                    "bbox": box, "score": float(inst.scores[k]),
                    "densepose": encode_iuv(iuv),
                    "segmentation": body_mask_rle(iuv, box, inp["height"], inp["width"])})

    def evaluate(self):
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
        if not comm.is_main_process():
            return {}
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            write_json_atomic(predictions,
                              os.path.join(self._output_dir, "densepose_results.json"))
        surface, reason = resolve_geodesics(self._data_dir)
        if surface is None:
            logger.warning(reason)
        with open(self._json_file) as f:
            dataset = json.load(f)
        return evaluate_densepose(dataset, predictions, surface)


@register_evaluator("densepose")
def _densepose(name, cfg, out):
    return DensePoseEvaluator(name, output_dir=out, data_dir=densepose_data_dir(cfg.DENSEPOSE.DATA))
