"""Geodesic point similarity (GPS) on a body surface.

A surface is a set of vertices, each with its chart (part id 1..24) and chart coordinates
(U, V), and the geodesic distances between vertices. A point (i, u, v) lies at the vertex of
chart i nearest to (u, v). For a detected person and the annotated points P of a person:

    GPS = 1/|P| * sum_p exp(-g(p, p_hat)^2 / (2 kappa^2)),   kappa = 0.255

where g is the geodesic distance between the annotated point's vertex and the vertex of the
prediction there (a point predicted as background contributes 0).

The SMPL surface of the published evaluation comes as three files (load_official_surface):
    SMPL_subdiv.mat            Part_ID_subdiv, U_subdiv, V_subdiv: chart and U/V per vertex
    SMPL_SUBDIV_TRANSFORM.mat  index: per vertex, its 1-based row in the distance table (0: none)
    Pdist_matrix.pkl           {"Pdist_matrix": (n(n-1)/2, 1)} pairwise geodesics, n = 27554,
                               in the evaluation's own pair order (official_pair_index)
"""
import os
import pickle

import numpy as np

from transfer.densepose.structures import N_CHARTS

OFFICIAL_FILES = ("SMPL_subdiv.mat", "SMPL_SUBDIV_TRANSFORM.mat", "Pdist_matrix.pkl")
KAPPA = 0.255


def official_pair_index(a, b, n):
    """Row of the distance table for rows a != b (0-based, ints or arrays) of an n x n
    table, in the pair order of the published evaluation."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    i, j = n - np.maximum(a, b) - 1, n - np.minimum(a, b) - 1
    k = n * (n - 1) // 2 - (n - i) * (n - i - 1) // 2 + j - i - 1
    return n * (n - 1) // 2 - k - 1


class BodySurface:
    """Vertices with chart id / U / V, and a geodesic distance function between vertices."""

    def __init__(self, part_ids, u, v, distance_fn):
        self.part_ids = np.asarray(part_ids, dtype=np.int64).ravel()
        self.uv = np.stack([np.asarray(u, float).ravel(), np.asarray(v, float).ravel()], 1)
        self.distance_fn = distance_fn
        self._charts = {c: np.nonzero(self.part_ids == c)[0] for c in range(1, N_CHARTS + 1)}

    def vertices(self, i, u, v):
        """Nearest vertex of chart i to (u, v), per point; -1 for background (i == 0)."""
        i = np.asarray(i, dtype=np.int64).ravel()
        uv = np.stack([np.asarray(u, float).ravel(), np.asarray(v, float).ravel()], 1)
        out = np.full(len(i), -1, dtype=np.int64)
        for c in np.unique(i[i > 0]):
            verts = self._charts.get(int(c))
            if verts is None or len(verts) == 0:
                continue
            sel = i == c
            d2 = ((uv[sel][:, None, :] - self.uv[verts][None]) ** 2).sum(-1)
            out[sel] = verts[d2.argmin(1)]
        return out

    def geodesics(self, va, vb):
        """Distance between vertex arrays; inf where either is -1 (background)."""
        va, vb = np.asarray(va), np.asarray(vb)
        out = np.full(len(va), np.inf)
        ok = (va >= 0) & (vb >= 0)
        if ok.any():
            out[ok] = self.distance_fn(va[ok], vb[ok])
        return out


def gps(surface, gt_iuv, pred_iuv, kappa=KAPPA):
    """GPS of a prediction at the annotated points: gt_iuv, pred_iuv = (i, u, v) arrays."""
    d = surface.geodesics(surface.vertices(*gt_iuv), surface.vertices(*pred_iuv))
    if len(d) == 0:
        return 0.0
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
    transform = loadmat(os.path.join(folder, "SMPL_SUBDIV_TRANSFORM.mat"))["index"]
    transform = np.asarray(transform, dtype=np.int64).ravel()
    with open(os.path.join(folder, "Pdist_matrix.pkl"), "rb") as f:
        table = np.asarray(pickle.load(f, encoding="latin1")["Pdist_matrix"]).ravel()
    n = int(round((1 + np.sqrt(1 + 8 * len(table))) / 2))
    if n * (n - 1) // 2 != len(table):
        raise ValueError(f"Pdist_matrix.pkl in {folder} holds {len(table)} distances, not "
                         f"n(n-1)/2 for any n")

    def distance(va, vb):
        ra, rb = transform[va] - 1, transform[vb] - 1
        out = np.full(len(ra), np.inf)
        ok = (ra >= 0) & (rb >= 0)
        same = ok & (ra == rb)
        out[same] = 0.0
        pair = ok & (ra != rb)
        out[pair] = table[official_pair_index(ra[pair], rb[pair], n)]
        return out

    return BodySurface(subdiv["Part_ID_subdiv"], subdiv["U_subdiv"], subdiv["V_subdiv"],
                       distance)


def write_official_surface(folder, part_ids, u, v, positions):
    """Write a surface whose geodesics are the Euclidean distances between `positions` (a
    flat or convex mesh: exact) in the official three-file format. For tests and fixtures."""
    from scipy.io import savemat

    os.makedirs(folder, exist_ok=True)
    n = len(part_ids)
    pos = np.asarray(positions, dtype=float)
    table = np.zeros((n * (n - 1) // 2, 1))
    a, b = np.triu_indices(n, 1)
    table[official_pair_index(a, b, n), 0] = np.linalg.norm(pos[a] - pos[b], axis=1)
    savemat(os.path.join(folder, "SMPL_subdiv.mat"),
            {"Part_ID_subdiv": np.asarray(part_ids, float)[None],
             "U_subdiv": np.asarray(u, float)[None], "V_subdiv": np.asarray(v, float)[None]})
    savemat(os.path.join(folder, "SMPL_SUBDIV_TRANSFORM.mat"),
            {"index": np.arange(1, n + 1, dtype=float)[:, None]})
    tmp = os.path.join(folder, "Pdist_matrix.pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"Pdist_matrix": table}, f)
    os.replace(tmp, os.path.join(folder, "Pdist_matrix.pkl"))


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
