"""DensePose results in compact form and their evaluation.

Each detected person is written as its box, score and an IUV image at the box's size
(uint8: chart index 0..24, U*255, V*255) stored as a base64 PNG. The evaluator reports
    bbox/AP...     COCO box AP (pycocotools)
    segm/AP...     COCO mask AP of the predicted body (coarse segmentation foreground)
    densepose/AP, AP50, AP75, APm, APl   GPS-based AP: COCO's matching and AP with GPS in
                   place of IoU, thresholds 0.5:0.05:0.95, up to 20 detections per image;
                   persons without DensePose points (and crowds) are ignore regions, matched
                   by box IoU. Needs the geodesic data (gps.py); without it, a warning says why.
"""
import base64
import contextlib
import copy
import io
import itertools
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transfer.d2 import ensure_detectron2

ensure_detectron2()

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.evaluation import DatasetEvaluator  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from transfer.densepose.gps import gps, load_official_surface  # noqa: E402
from transfer.densepose.structures import FRAME, has_densepose  # noqa: E402

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- compact IUV
def box_iuv(output, box_xyxy):
    """One detection's 56x56 maps -> uint8 IUV (3, H, W) at the size of its box."""
    x0, y0, x1, y1 = [float(b) for b in box_xyxy]
    size = (max(1, int(round(y1 - y0))), max(1, int(round(x1 - x0))))

    def up(t):
        return F.interpolate(t.float(), size, mode="bilinear", align_corners=False)[0]

    fg = up(output.coarse_segm).argmax(0) > 0
    i = up(output.fine_segm).argmax(0) * fg
    u = up(output.u).gather(0, i[None])[0].clamp(0, 1)
    v = up(output.v).gather(0, i[None])[0].clamp(0, 1)
    return torch.stack([i.to(torch.uint8), (u * 255).round().to(torch.uint8),
                        (v * 255).round().to(torch.uint8)]).cpu().numpy()


def encode_iuv(iuv):
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(iuv.transpose(1, 2, 0))).save(buf, format="PNG")
    return {"size": list(iuv.shape[1:]), "iuv_png": base64.b64encode(buf.getvalue()).decode()}


def decode_iuv(compact):
    img = Image.open(io.BytesIO(base64.b64decode(compact["iuv_png"])))
    return np.asarray(img).transpose(2, 0, 1)


def body_mask_rle(iuv, box_xywh, height, width):
    """RLE (image size) of the predicted body: IUV foreground pasted at the box."""
    canvas = np.zeros((height, width), dtype=np.uint8, order="F")
    x0, y0 = int(round(box_xywh[0])), int(round(box_xywh[1]))
    h, w = iuv.shape[1:]
    ys, xs = slice(max(0, y0), min(height, y0 + h)), slice(max(0, x0), min(width, x0 + w))
    canvas[ys, xs] = iuv[0, ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] > 0
    rle = mask_util.encode(canvas)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def iuv_at_points(iuv, det_box_xywh, px, py):
    """Predicted (i, u, v) at image points (background outside the detection's box)."""
    x0, y0, w, h = det_box_xywh
    hh, ww = iuv.shape[1:]
    c = np.floor((px - x0) / max(w, 1e-6) * ww).astype(np.int64)
    r = np.floor((py - y0) / max(h, 1e-6) * hh).astype(np.int64)
    inside = (c >= 0) & (c < ww) & (r >= 0) & (r < hh)
    i, u, v = np.zeros(len(px), np.int64), np.zeros(len(px)), np.zeros(len(px))
    i[inside] = iuv[0, r[inside], c[inside]]
    u[inside] = iuv[1, r[inside], c[inside]] / 255.0
    v[inside] = iuv[2, r[inside], c[inside]] / 255.0
    return i, u, v


def annotated_points(gt):
    """Image coordinates and (i, u, v) of a person's annotated points."""
    x0, y0, w, h = gt["bbox"]
    px = x0 + np.asarray(gt["dp_x"], float) / FRAME * w
    py = y0 + np.asarray(gt["dp_y"], float) / FRAME * h
    return px, py, (np.asarray(gt["dp_I"]), np.asarray(gt["dp_U"]), np.asarray(gt["dp_V"]))


# ---------------------------------------------------------------- GPS-based AP
class GPSEval(COCOeval):
    """COCOeval with GPS in place of IoU (keypoint-style parameters: maxDets 20, areas
    all/medium/large). Ground truth must carry ``num_keypoints`` = its number of points, so
    that persons without points are ignored like COCO's keypoint-less persons."""

    def __init__(self, coco_gt, coco_dt, surface, kappa):
        super().__init__(coco_gt, coco_dt, iouType="keypoints")
        self.surface, self.kappa = surface, kappa

    def computeOks(self, imgId, catId):  # noqa: N802  (COCOeval's name)
        p = self.params
        gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        dts = [dts[k] for k in order][:p.maxDets[-1]]
        if not gts or not dts:
            return []
        sims = np.zeros((len(dts), len(gts)))
        for g_idx, g in enumerate(gts):
            if g.get("num_keypoints", 0) == 0 or g.get("iscrowd", 0):
                sims[:, g_idx] = mask_util.iou([d["bbox"] for d in dts], [g["bbox"]],
                                               [int(g.get("iscrowd", 0))])[:, 0]
                continue
            px, py, gt_iuv = annotated_points(g)
            for d_idx, d in enumerate(dts):
                if "_iuv" not in d:
                    d["_iuv"] = decode_iuv(d["densepose"])
                pred = iuv_at_points(d["_iuv"], d["bbox"], px, py)
                sims[d_idx, g_idx] = gps(self.surface, gt_iuv, pred, self.kappa)
        return sims


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


def gt_coco(dataset):
    """A COCO object from a DensePose-COCO dict, persons' num_keypoints = their point count."""
    dataset = copy.deepcopy(dataset)
    for a in dataset["annotations"]:
        a["num_keypoints"] = len(a["dp_x"]) if has_densepose(a) else 0
    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    return coco


def evaluate_densepose(dataset, predictions, surface=None, kappa=0.255):
    """{bbox: ..., segm: ..., densepose: ...} for predictions in compact form."""
    coco = gt_coco(dataset)
    results = {}
    if not predictions:
        logger.warning("no detections: every AP is 0")
        results["bbox"] = {n: 0.0 for n in BOX_NAMES}
        if surface is not None:
            results["densepose"] = {n: 0.0 for n in GPS_NAMES}
        return results
    dets = [{k: p[k] for k in ("image_id", "category_id", "bbox", "score")} for p in predictions]
    results["bbox"] = _stats(COCOeval(coco, _quiet(coco.loadRes, dets), "bbox"), BOX_NAMES)
    if all("segmentation" in a for a in dataset["annotations"]):
        segs = [{k: p[k] for k in ("image_id", "category_id", "segmentation", "score")}
                for p in predictions]
        results["segm"] = _stats(COCOeval(coco, _quiet(coco.loadRes, segs), "segm"), BOX_NAMES)
    if surface is not None:
        res = COCO()
        res.dataset = {"images": dataset["images"], "categories": dataset["categories"],
                       "annotations": [dict(p, id=k + 1, area=p["bbox"][2] * p["bbox"][3])
                                       for k, p in enumerate(predictions)]}
        _quiet(res.createIndex)
        results["densepose"] = _stats(GPSEval(coco, res, surface, kappa), GPS_NAMES)
    return results


def resolve_geodesics(data_dir):
    """(surface or None, reason why not) from the DensePose data folder."""
    try:
        return load_official_surface(data_dir), ""
    except FileNotFoundError as e:
        return None, (f"{e}. GPS-based AP (densepose/AP...) is not computed: put the files in "
                      f"DENSEPOSE.DATA (default $DETECTRON2_DATASETS/densepose/)")


class DensePoseEvaluator(DatasetEvaluator):
    def __init__(self, dataset_name, output_dir=None, data_dir="", kappa=0.255):
        meta = MetadataCatalog.get(dataset_name)
        self._json_file = meta.json_file
        self._to_dataset_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        self._output_dir = output_dir
        self._data_dir, self._kappa = data_dir, kappa
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
            path = os.path.join(self._output_dir, "densepose_results.json")
            with open(path + ".tmp", "w") as f:
                json.dump(predictions, f)
            os.replace(path + ".tmp", path)
        surface, reason = resolve_geodesics(self._data_dir)
        if surface is None:
            logger.warning(reason)
        with open(self._json_file) as f:
            dataset = json.load(f)
        return evaluate_densepose(dataset, predictions, surface, self._kappa)
