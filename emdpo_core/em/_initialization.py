"""Initial responsibilities for EM: given, Dirichlet, random or k-means clusters of the
annotators (per-annotator position features of the items they rank, k-means++ seeding and
weighted Lloyd iterations in Numba)."""

from __future__ import annotations

import numba
import numpy as np

from .._checks import check_responsibilities

INIT_PARAMS = ("kmeans", "random", "dirichlet")
# Hard initial assignments (k-means, random) are smoothed: g = (1 - s) onehot + s / K, so no
# type starts with zero weight and every record informs every type's first M-step a little.
INIT_SMOOTHING = 0.05


def initial_responsibilities(init, family, g, shards, K, rng) -> np.ndarray:
    """(H_local, K) initial responsibilities for ``init_params`` = ``init``. In a
    distributed fit (``shards``, an EMShards) they are drawn for all H annotators of the union
    (the same draws on every rank, so the one-process ones) and each rank keeps its rows."""
    H = shards.n_annotators(g)
    rows = np.arange(H) if shards.layout is None else shards.layout.global_index
    if not isinstance(init, str):
        return check_responsibilities(init, H, K, "init_params")[rows]
    if init == "dirichlet":
        return rng.dirichlet(np.ones(K), size=H)[rows]
    if init == "random":
        labels = rng.integers(0, K, size=H)[rows]
    else:
        X = np.ascontiguousarray(family.annotator_features(g), dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != g.n_annotators:
            raise ValueError(f"{type(family).__name__}.annotator_features: expected "
                             f"shape ({g.n_annotators}, D), got {X.shape}")
        X, weight = shards.gather_rows(X, g.annotator_weight)
        centers = kmeans_plus_plus(X, weight, K, rng)
        labels, _, _ = kmeans_lloyd(X, weight, centers, 100)
        labels = labels[rows]
    return smoothed_assignments(labels, K)


def smoothed_assignments(labels: np.ndarray, K: int) -> np.ndarray:
    """(H, K) responsibilities of hard labels: the label gets 1 - INIT_SMOOTHING, the rest is
    spread evenly, so that no type starts with an exactly zero weight for anybody."""
    resp = np.full((labels.shape[0], K), INIT_SMOOTHING / K)
    resp[np.arange(labels.shape[0]), labels] += 1.0 - INIT_SMOOTHING
    return resp


@numba.njit(cache=True, nogil=True)
def position_features(items, offsets, n_ranked, annotator_offsets, record_weight, column_of,
                      n_columns):
    """(H, n_columns) mean normalized position score of each item per annotator.

    Slot j < L of a list of m scores 1 - j/(m-1) (1 = best, 0 = worst); the m - L unranked
    slots share the mean of the remaining scores. Items the annotator never saw score 0.5.
    column_of maps an item id to its feature column (-1: not a feature).
    """
    H = annotator_offsets.shape[0] - 1
    feats = np.full((H, n_columns), 0.5, dtype=np.float64)
    total = np.zeros(n_columns, dtype=np.float64)
    count = np.zeros(n_columns, dtype=np.float64)
    touched = np.empty(n_columns, dtype=np.int64)
    for h in range(H):
        n_touched = 0
        for r in range(annotator_offsets[h], annotator_offsets[h + 1]):
            a = offsets[r]
            m = offsets[r + 1] - a
            L = n_ranked[r]
            c = record_weight[r]
            if c == 0.0:
                continue
            tail = 1.0 - (L + m - 1) / (2.0 * (m - 1))   # mean score of slots L..m-1
            for j in range(m):
                col = column_of[items[a + j]]
                if col < 0:
                    continue
                score = 1.0 - j / (m - 1.0) if j < L else tail
                if count[col] == 0.0:
                    touched[n_touched] = col
                    n_touched += 1
                total[col] += c * score
                count[col] += c
        for q in range(n_touched):
            col = touched[q]
            feats[h, col] = total[col] / count[col]
            total[col] = 0.0
            count[col] = 0.0
    return feats


@numba.njit(cache=True, nogil=True)
def _sq_dist(x, y):
    d = 0.0
    for j in range(x.shape[0]):
        t = x[j] - y[j]
        d += t * t
    return d


@numba.njit(cache=True, nogil=True)
def kmeans_lloyd(X, weight, centers, max_iter):
    """Weighted Lloyd iterations from the given centers. An empty cluster is re-seeded at
    the point farthest from its center. Returns (labels (H,), centers, n_iter)."""
    H, D = X.shape
    K = centers.shape[0]
    labels = np.full(H, -1, dtype=np.int64)
    dist = np.empty(H, dtype=np.float64)
    it = 0
    for it in range(1, max_iter + 1):
        changed = False
        for h in range(H):
            best = 0
            bd = np.inf
            for k in range(K):
                d = _sq_dist(X[h], centers[k])
                if d < bd:
                    bd = d
                    best = k
            dist[h] = bd
            if labels[h] != best:
                labels[h] = best
                changed = True
        sums = np.zeros((K, D), dtype=np.float64)
        mass = np.zeros(K, dtype=np.float64)
        for h in range(H):
            k = labels[h]
            mass[k] += weight[h]
            for j in range(D):
                sums[k, j] += weight[h] * X[h, j]
        for k in range(K):
            if mass[k] > 0.0:
                for j in range(D):
                    centers[k, j] = sums[k, j] / mass[k]
            else:
                far = np.argmax(dist)
                centers[k] = X[far]
                dist[far] = -1.0
                labels[far] = k
                changed = True
        if not changed:
            break
    return labels, centers, it


def kmeans_plus_plus(X, weight, K, rng):
    """k-means++ seeding (Arthur and Vassilvitskii 2007), weighted: centers drawn with
    probability proportional to weight * squared distance to the nearest center."""
    H = X.shape[0]
    p = weight / weight.sum()
    centers = np.empty((K, X.shape[1]))
    centers[0] = X[rng.choice(H, p=p)]
    d2 = np.sum((X - centers[0]) ** 2, axis=1)
    for k in range(1, K):
        mass = weight * d2
        total = mass.sum()
        idx = rng.choice(H, p=mass / total) if total > 0 else rng.choice(H, p=p)
        centers[k] = X[idx]
        np.minimum(d2, np.sum((X - centers[k]) ** 2, axis=1), out=d2)
    return centers
