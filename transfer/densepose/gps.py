"""Geodesic point similarity (GPS) on a body surface, as the official DensePose-COCO evaluator
computes it.

A surface is a set of vertices, each with its chart (part id 1..24) and chart coordinates
(U, V), and the geodesic distances between vertices. A point (i, u, v) lies at the vertex of
chart i nearest to (u, v) (Euclidean in (U, V); the first vertex on a tie). For a detected
person and the annotated points P of a person:

    GPS = 1/|P| * sum_p exp(-g(p, p_hat)^2 / (2 kappa_p^2))

where g is the geodesic distance between the annotated point's vertex and the vertex of the
prediction there (a point predicted as background contributes 0), and kappa_p the constant of
the annotated point's coarse body part (CHART_KAPPA: torso 0.351 ... hands 0.107).

The SMPL surface of the published evaluation comes as three files (load_official_surface):
    SMPL_subdiv.mat            Part_ID_subdiv (int32 1xN), U_subdiv, V_subdiv (float 1xN)
    SMPL_SUBDIV_TRANSFORM.mat  index (int32 Nx1): per vertex, its 1-based row in the table
    Pdist_matrix.pkl           {"Pdist_matrix": float64 (n(n-1)/2, 1)}: geodesics between the
                               n rows; rows a > b (0-based) at position a(a-1)/2 + b
"""
import os
import pickle

import numpy as np
from scipy.spatial.distance import cdist

from convert import safe_load
from convert.files import atomic_open
from transfer.densepose.structures import N_CHARTS

OFFICIAL_FILES = ("SMPL_subdiv.mat", "SMPL_SUBDIV_TRANSFORM.mat", "Pdist_matrix.pkl")

# kappa by coarse body part of the annotated chart (the official evaluator's constants)
KAPPA_BY_PART = {(1, 2): 0.351,  # torso
                 (3, 4): 0.107,  # hands
                 (5, 6): 0.126,  # feet
                 (7, 8, 9, 10): 0.237,  # upper legs
                 (11, 12, 13, 14): 0.173,  # lower legs
                 (15, 16, 17, 18): 0.142,  # upper arms
                 (19, 20, 21, 22): 0.128,  # lower arms
                 (23, 24): 0.150}  # head
CHART_KAPPA = np.zeros(N_CHARTS + 1)
for _charts, _kappa in KAPPA_BY_PART.items():
    CHART_KAPPA[list(_charts)] = _kappa


def pair_position(a, b):
    """Position in the distance table of the pair of rows a != b (0-based ints or arrays)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return hi * (hi - 1) // 2 + lo


class BodySurface:
    """Vertices with chart id / U / V, each on a row of a table of geodesic distances."""

    def __init__(self, part_ids, u, v, rows, table):
        self.part_ids = np.asarray(part_ids, dtype=np.int64).ravel()
        self.uv = np.stack([np.asarray(u, float).ravel(), np.asarray(v, float).ravel()], 1)
        self.rows = np.asarray(rows, dtype=np.int64).ravel()  # 0-based
        self.table = np.asarray(table, dtype=np.float64).ravel()
        self._charts = {c: np.nonzero(self.part_ids == c)[0] for c in range(1, N_CHARTS + 1)}

    def vertices(self, i, u, v):
        """Nearest vertex of chart i to (u, v), per point (first on a tie); -1 where i is not
        a chart of the surface (0 = background)."""
        i = np.asarray(i).ravel().astype(np.int64)
        uv = np.stack([np.asarray(u, float).ravel(), np.asarray(v, float).ravel()], 1)
        out = np.full(len(i), -1, dtype=np.int64)
        for c in np.unique(i):
            verts = self._charts.get(int(c))
            if verts is None or len(verts) == 0:
                continue
            sel = i == c
            out[sel] = verts[cdist(self.uv[verts], uv[sel]).argmin(0)]
        return out

    def geodesics(self, va, vb):
        """Distance between vertex arrays; inf where either is -1."""
        va, vb = np.asarray(va, dtype=np.int64), np.asarray(vb, dtype=np.int64)
        out = np.full(len(va), np.inf)
        ok = (va >= 0) & (vb >= 0)
        ra, rb = self.rows[va[ok]], self.rows[vb[ok]]
        d = np.zeros(len(ra))
        pair = ra != rb
        d[pair] = self.table[pair_position(ra[pair], rb[pair])]
        out[ok] = d
        return out


def gps(surface, gt_iuv, pred_iuv):
    """GPS of a prediction at the annotated points: gt_iuv, pred_iuv = (i, u, v) arrays (the
    prediction's chart 0 = background). Annotated points off the surface's charts do not
    count; 0 when none counts."""
    gt_v = surface.vertices(*gt_iuv)
    on = gt_v >= 0
    if not on.any():
        return 0.0
    d = surface.geodesics(gt_v[on], surface.vertices(*pred_iuv)[on])
    kappa = CHART_KAPPA[surface.part_ids[gt_v[on]]]
    return float(np.mean(np.exp(-(d ** 2) / (2 * kappa ** 2))))


def load_official_surface(folder):
    """The SMPL surface of the published evaluation from the three files in `folder`."""
    from scipy.io import loadmat

    missing = [f for f in OFFICIAL_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"geodesic data for GPS not found: {', '.join(missing)} missing in {folder} "
            f"(expected the DensePose evaluation files {', '.join(OFFICIAL_FILES)})")
    subdiv = loadmat(os.path.join(folder, "SMPL_subdiv.mat"))
    index = np.asarray(loadmat(os.path.join(folder, "SMPL_SUBDIV_TRANSFORM.mat"))["index"])
    table = np.asarray(safe_load.load_pickle(  # data only: numpy arrays
        os.path.join(folder, "Pdist_matrix.pkl"))["Pdist_matrix"]).ravel()
    n = int(round((1 + np.sqrt(1 + 8 * len(table))) / 2))
    if n * (n - 1) // 2 != len(table):
        raise ValueError(f"Pdist_matrix.pkl in {folder} holds {len(table)} distances, not "
                         f"n(n-1)/2 for any n")
    index = index.ravel().astype(np.int64)
    if index.size != subdiv["Part_ID_subdiv"].size or index.min() < 1 or index.max() > n:
        raise ValueError(
            f"SMPL_SUBDIV_TRANSFORM.mat in {folder}: 'index' must give every one of the "
            f"{subdiv['Part_ID_subdiv'].size} vertices a row 1..{n} of Pdist_matrix.pkl")
    return BodySurface(subdiv["Part_ID_subdiv"], subdiv["U_subdiv"], subdiv["V_subdiv"],
                       index - 1, table)


def write_official_surface(folder, part_ids, u, v, positions):
    """Write a surface whose geodesics are the Euclidean distances between `positions` (a
    flat or convex mesh: exact) in the official three-file layout and dtypes, one table row
    per vertex. For tests and fixtures."""
    from scipy.io import savemat

    os.makedirs(folder, exist_ok=True)
    n = len(part_ids)
    pos = np.asarray(positions, dtype=np.float64)
    table = np.zeros((n * (n - 1) // 2, 1), dtype=np.float64)
    a, b = np.tril_indices(n, -1)  # a > b
    table[pair_position(a, b), 0] = np.linalg.norm(pos[a] - pos[b], axis=1)
    files = {
        "SMPL_subdiv.mat": {"Part_ID_subdiv": np.asarray(part_ids, np.int32)[None],
                            "U_subdiv": np.asarray(u, np.float64)[None],
                            "V_subdiv": np.asarray(v, np.float64)[None]},
        "SMPL_SUBDIV_TRANSFORM.mat": {"index": np.arange(1, n + 1, dtype=np.int32)[:, None]},
    }
    for name, arrays in files.items():
        with atomic_open(os.path.join(folder, name), "wb") as f:
            savemat(f, arrays)
    with atomic_open(os.path.join(folder, "Pdist_matrix.pkl"), "wb") as f:
        pickle.dump({"Pdist_matrix": table}, f)


def grid_surface(steps=3, chart_width=0.1):
    """A flat test surface: chart c is the square [(c-1) w, c w] x [0, w] of a plane strip,
    with vertices at a steps x steps grid of (U, V); geodesics = Euclidean distances."""
    part_ids, us, vs, pos = [], [], [], []
    grid = np.linspace(0, 1, steps)
    for c in range(1, N_CHARTS + 1):
        for uu in grid:
            for vv in grid:
                part_ids.append(c)
                us.append(uu)
                vs.append(vv)
                pos.append(((c - 1 + uu) * chart_width, vv * chart_width))
    return np.array(part_ids), np.array(us), np.array(vs), np.array(pos)
