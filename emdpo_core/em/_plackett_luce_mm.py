"""Numba bookkeeping for EM: grouping records by annotator (and, in later modules, mixture
weights, the tabular MM M-step and initialisation). Functions take and return arrays only;
no fastmath (results must match the references exactly)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _counting_sort(ids, n_groups):
    """Stable counting sort of ids in [0, n_groups): (order, offsets)."""
    n = ids.shape[0]
    offsets = np.zeros(n_groups + 1, dtype=np.int64)
    for i in range(n):
        offsets[ids[i] + 1] += 1
    for h in range(n_groups):
        offsets[h + 1] += offsets[h]
    cursor = offsets[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        h = ids[i]
        order[cursor[h]] = i
        cursor[h] += 1
    return order, offsets


def group_by_annotator(annotator_ids, n_annotators=None):
    """Group records by annotator, keeping the records' order within each annotator.

    Args:
        annotator_ids: (N,) integer ids in [0, H).
        n_annotators: H; default max(annotator_ids) + 1. Annotators without records are
            allowed (their posterior stays the prior).

    Returns:
        (order, annotator_offsets): ``order`` (N,) int64 permutation putting the records in
        annotator order (record ``order[j]`` goes to position j), and ``annotator_offsets``
        (H+1,) int64 so that annotator h owns positions annotator_offsets[h]:
        annotator_offsets[h+1].

    Example:
        >>> import emdpo_core as ec
        >>> order, ao = ec.group_by_annotator([1, 0, 1, 2])
        >>> order.tolist(), ao.tolist()
        ([1, 0, 2, 3], [0, 1, 3, 4])
    """
    a = np.asarray(annotator_ids)
    if a.ndim != 1:
        raise ValueError(f"annotator_ids: expected a 1-D integer array, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("annotator_ids: expected at least one record, got an empty array")
    if a.dtype.kind not in "iu":
        raise TypeError(f"annotator_ids: expected integer ids, got dtype {a.dtype}")
    ids = np.ascontiguousarray(a, dtype=np.int64)
    neg = np.flatnonzero(ids < 0)
    if neg.size:
        raise ValueError(f"annotator_ids: expected ids >= 0, got {ids[neg[0]]} at index {neg[0]}")
    top = int(ids.max())
    if n_annotators is None:
        H = top + 1
    else:
        if isinstance(n_annotators, bool) or not isinstance(n_annotators, (int, np.integer)):
            raise TypeError(f"n_annotators: expected an int, got {type(n_annotators).__name__}")
        H = int(n_annotators)
        if top >= H:
            i = int(np.argmax(ids >= H))
            raise ValueError(f"annotator_ids: id {ids[i]} at index {i} is out of range for "
                             f"n_annotators={H}")
    return _counting_sort(ids, H)


# ----------------------------------------------------------------------------------------
# Ranking data checks


@numba.njit(cache=True, nogil=True)
def first_repeated_item(items, offsets, n_items):
    """First (record, slot) whose item already appeared earlier in the same record, else
    (-1, -1). One pass with a stamp array: O(M + n_items)."""
    stamp = np.full(n_items, -1, dtype=np.int64)
    for i in range(offsets.shape[0] - 1):
        for j in range(offsets[i], offsets[i + 1]):
            it = items[j]
            if stamp[it] == i:
                return i, j
            stamp[it] = i
    return -1, -1


@numba.njit(cache=True, nogil=True)
def candidate_set_masks(items, offsets, n_words):
    """(N, n_words) uint64 bitmask of each record's candidate set (exact set identity)."""
    N = offsets.shape[0] - 1
    out = np.zeros((N, n_words), dtype=np.uint64)
    one = np.uint64(1)
    for i in range(N):
        for j in range(offsets[i], offsets[i + 1]):
            it = items[j]
            out[i, it >> 6] |= one << np.uint64(it & 63)
    return out


# ----------------------------------------------------------------------------------------
# EM bookkeeping: record weights, mixture weights, weighted observed-data log-likelihood


@numba.njit(cache=True, nogil=True)
def expand_record_weights(responsibilities, annotator_offsets, record_weight, annotator_weight):
    """M-step weights w[k, i] = c_i * v_{a_i} * g_{a_i k} for records grouped by annotator.

    responsibilities (H, K); annotator_offsets (H+1,); record_weight (N,) c_i;
    annotator_weight (H,) v_h. Returns (K, N) float64.
    """
    H, K = responsibilities.shape
    N = annotator_offsets[H]
    out = np.empty((K, N), dtype=np.float64)
    for h in range(H):
        v = annotator_weight[h]
        for i in range(annotator_offsets[h], annotator_offsets[h + 1]):
            c = record_weight[i] * v
            for k in range(K):
                out[k, i] = c * responsibilities[h, k]
    return out


@numba.njit(cache=True, nogil=True)
def mixture_weights(responsibilities, annotator_weight, alpha):
    """MAP mixture weights under a symmetric Dirichlet(alpha) prior, alpha >= 1:
    eta_k = (sum_h v_h g_hk + alpha - 1) / (sum_h v_h + K (alpha - 1))."""
    H, K = responsibilities.shape
    totals = np.zeros(K, dtype=np.float64)
    for h in range(H):
        v = annotator_weight[h]
        for k in range(K):
            totals[k] += v * responsibilities[h, k]
    denom = 0.0
    for k in range(K):
        totals[k] += alpha - 1.0
        denom += totals[k]
    for k in range(K):
        totals[k] /= denom
    return totals


@numba.njit(cache=True, nogil=True)
def weighted_loglik(annotator_loglik, log_weights, annotator_weight):
    """sum_h v_h logsumexp_k (log eta_k + S_hk): the observed-data log-likelihood when each
    annotator stands for v_h identical annotators. Also returns the (H,) per-annotator terms."""
    H, K = annotator_loglik.shape
    per = np.empty(H, dtype=np.float64)
    total = 0.0
    for h in range(H):
        mx = -np.inf
        for k in range(K):
            x = log_weights[k] + annotator_loglik[h, k]
            if x > mx:
                mx = x
        z = 0.0
        for k in range(K):
            z += np.exp(log_weights[k] + annotator_loglik[h, k] - mx)
        per[h] = mx + np.log(z)
        total += annotator_weight[h] * per[h]
    return total, per


# ----------------------------------------------------------------------------------------
# Weighted Plackett-Luce M-step: Hunter's (2004) minorization-maximization (MM) algorithm


@numba.njit(cache=True, nogil=True, parallel=True)
def pl_wins(items, offsets, n_ranked, weights, n_items):
    """(K, n_items) weighted number of times each item is chosen (ranked at a stage t < L):
    wins[k, i] = sum_r weights[k, r] * #{t < L_r : item of slot t of r is i}.
    One type per thread, each in its own row: the same sums for any thread count."""
    K = weights.shape[0]
    N = offsets.shape[0] - 1
    wins = np.zeros((K, n_items), dtype=np.float64)
    for k in numba.prange(K):
        row = wins[k]
        w = weights[k]
        for r in range(N):
            a = offsets[r]
            for t in range(n_ranked[r]):
                row[items[a + t]] += w[r]
    return wins


@numba.njit(cache=True, nogil=True)
def _pl_mm_one(items, offsets, n_ranked, w, wins, theta, pseudo_count, m_max, out):
    """One MM step for one type (see pl_mm_step). Writes the new log-worths into out."""
    n_items = theta.shape[0]
    top = theta.max()
    gamma = np.exp(theta - top)          # worths scaled so that the largest is 1
    dummy = np.exp(-top)                 # the pseudo-count dummy item (worth 1) on that scale
    denom = np.zeros(n_items, dtype=np.float64)
    suffix = np.empty(m_max, dtype=np.float64)
    N = offsets.shape[0] - 1
    for r in range(N):
        wr = w[r]
        if wr == 0.0:
            continue
        a = offsets[r]
        m = offsets[r + 1] - a
        L = n_ranked[r]
        acc = 0.0
        for s in range(m - 1, -1, -1):   # suffix sums: total worth still in play at stage s
            acc += gamma[items[a + s]]
            suffix[s] = acc
        run = 0.0
        for j in range(m):               # the item in slot j is in play at stages t <= j
            if j < L:
                run += wr / suffix[j]
            denom[items[a + j]] += run
    for i in range(n_items):
        num = wins[i] + pseudo_count
        den = denom[i] + 2.0 * pseudo_count / (gamma[i] + dummy)
        if den > 0.0 and num > 0.0:
            out[i] = np.log(num) - np.log(den) + top
        elif den > 0.0:
            out[i] = -np.inf             # chosen never, in play sometimes: MLE worth 0
        else:
            out[i] = theta[i]            # never in play, no pseudo-count: no information


@numba.njit(cache=True, nogil=True, parallel=True)
def pl_mm_step(items, offsets, n_ranked, weights, wins, log_worths, pseudo_count, m_max):
    """One monotone MM update of the K Plackett-Luce log-worth vectors (Hunter 2004).

    For type k with worths gamma = exp(theta) and record weights w_r = weights[k, r]:
        gamma_i <- (wins_i + c) / ( sum_r w_r sum_{t < L_r, i in R_rt} 1 / sum_{s in R_rt} gamma_s
                                    + 2 c / (gamma_i + 1) )
    where R_rt is the set of items still in play at stage t of record r (slots t..m_r-1) and
    c = pseudo_count: c virtual wins and c virtual losses of each item against a dummy item of
    fixed worth 1. This is exactly Hunter's MM on the data plus the virtual comparisons, so it
    never decreases  sum_r w_r ll_r(theta) + c * sum_i (theta_i - 2 log(1 + exp theta_i)).
    Types are independent: the loop over types runs in parallel, each in its own row, so the
    result does not depend on the thread count.
    """
    K, n_items = log_worths.shape
    out = np.empty_like(log_worths)
    for k in numba.prange(K):
        _pl_mm_one(items, offsets, n_ranked, weights[k], wins[k], log_worths[k], pseudo_count,
                   m_max, out[k])
    return out


@numba.njit(cache=True, nogil=True, parallel=True)
def pl_weighted_loglik(items, offsets, n_ranked, weights, log_worths, m_max):
    """(K,) sum_r weights[k, r] * ll_r(log_worths[k]) in float64, O(m) per record (suffix
    log-sum-exp). Used by tests and by the tabular initialisation's inner MM loop."""
    K = log_worths.shape[0]
    N = offsets.shape[0] - 1
    out = np.zeros(K, dtype=np.float64)
    for k in numba.prange(K):
        theta = log_worths[k]
        lse = np.empty(m_max, dtype=np.float64)
        total = 0.0
        for r in range(N):
            wr = weights[k, r]
            if wr == 0.0:
                continue
            a = offsets[r]
            m = offsets[r + 1] - a
            acc = -np.inf
            for s in range(m - 1, -1, -1):
                x = theta[items[a + s]]
                acc = max(acc, x) + np.log1p(np.exp(-abs(acc - x))) if acc > -np.inf else x
                lse[s] = acc
            ll = 0.0
            for t in range(n_ranked[r]):
                ll += theta[items[a + t]] - lse[t]
            total += wr * ll
        out[k] = total
    return out


@numba.njit(cache=True, nogil=True)
def _log_of_product(x, n):
    """sum_{t < n} log x[t] for positive x with few logs: the factors are multiplied and the
    running product is logged only when it leaves [1e-200, 1e200] (factors below 1e-100 are
    logged at once), so it never over- or underflows."""
    logs = 0.0
    prod = 1.0
    for t in range(n):
        v = x[t]
        if v < 1e-100:
            logs += np.log(v)
            continue
        prod *= v
        if prod < 1e-200 or prod > 1e200:
            logs += np.log(prod)
            prod = 1.0
    return logs + np.log(prod)


@numba.njit(cache=True, nogil=True)
def _pl_scaled_loglik_one(items, offsets, n_ranked, w, theta, m_max):
    """sum_r w_r ll_r(theta) for one type with worths scaled by the largest (see
    pl_scaled_loglik)."""
    top = theta.max()
    gamma = np.exp(theta - top)
    suffix = np.empty(m_max, dtype=np.float64)
    total = 0.0
    for r in range(offsets.shape[0] - 1):
        wr = w[r]
        if wr == 0.0:
            continue
        a = offsets[r]
        m = offsets[r + 1] - a
        acc = 0.0
        for s in range(m - 1, -1, -1):
            acc += gamma[items[a + s]]
            suffix[s] = acc
        L = n_ranked[r]
        ll = 0.0
        for t in range(L):
            ll += theta[items[a + t]]
        total += wr * (ll - L * top - _log_of_product(suffix, L))
    return total


@numba.njit(cache=True, nogil=True, parallel=True)
def pl_scaled_loglik(items, offsets, n_ranked, weights, log_worths, m_max):
    """(K,) sum_r weights[k, r] * ll_r(log_worths[k]), like :func:`pl_weighted_loglik`, but
    from worths scaled so that the largest is 1 (one exp per item, one log per stage instead
    of a log-sum-exp per slot: several times faster). Accurate to rounding while the
    log-worths of a type span less than about 700 (the tabular family keeps them so); beyond
    that, worths underflow to 0 and a chosen item of worth 0 gives -inf."""
    K = log_worths.shape[0]
    out = np.zeros(K, dtype=np.float64)
    for k in numba.prange(K):
        out[k] = _pl_scaled_loglik_one(items, offsets, n_ranked, weights[k], log_worths[k],
                                       m_max)
    return out


@numba.njit(cache=True, nogil=True)
def _pl_grad_hess_one(items, offsets, n_ranked, w, theta, m_max, grad, hess):
    """Gradient and Hessian of sum_r w_r ll_r(theta) for one type (see pl_grad_hess);
    returns the value."""
    top = theta.max()
    gamma = np.exp(theta - top)          # worths scaled so that the largest is 1
    g = np.empty(m_max, dtype=np.float64)
    suffix = np.empty(m_max, dtype=np.float64)
    c1 = np.empty(m_max, dtype=np.float64)
    c2 = np.empty(m_max, dtype=np.float64)
    total = 0.0
    for r in range(offsets.shape[0] - 1):
        wr = w[r]
        if wr == 0.0:
            continue
        a = offsets[r]
        m = offsets[r + 1] - a
        L = n_ranked[r]
        acc = 0.0
        for s in range(m - 1, -1, -1):
            g[s] = gamma[items[a + s]]
            acc += g[s]
            suffix[s] = acc
        run1 = 0.0
        run2 = 0.0
        ll = 0.0
        for j in range(m):               # stages t <= min(j, L - 1) have slot j in play
            if j < L:
                inv = 1.0 / suffix[j]
                run1 += inv
                run2 += inv * inv
                grad[items[a + j]] += wr
                ll += theta[items[a + j]]
            c1[j] = run1
            c2[j] = run2
        total += wr * (ll - L * top - _log_of_product(suffix, L))
        for j in range(m):
            ij = items[a + j]
            wg = wr * g[j]
            grad[ij] -= wg * c1[j]
            # Slots q > j share the stages t <= min(j, L - 1): the c2[j] terms. Each pair is
            # added once, to whichever of (ij, iq), (iq, ij) comes first; the two triangles
            # are summed and mirrored at the end.
            hess[ij, ij] += wg * (g[j] * c2[j] - c1[j])
            for q in range(j + 1, m):
                hess[ij, items[a + q]] += wg * g[q] * c2[j]
    n = theta.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            x = hess[i, j] + hess[j, i]
            hess[i, j] = x
            hess[j, i] = x
    return total


@numba.njit(cache=True, nogil=True, parallel=True)
def pl_grad_hess(items, offsets, n_ranked, weights, log_worths, m_max):
    """Value (K,), gradient (K, n_items) and Hessian (K, n_items, n_items) of the weighted
    Plackett-Luce log-likelihood Q_k(theta) = sum_r weights[k, r] ll_r(theta) at
    theta = log_worths[k] (value as in :func:`pl_scaled_loglik`).

    With p_ts = gamma_s / S_t the probability of slot s at stage t (S_t = sum_{u >= t}
    gamma_u, the suffix sum of worths),
        dQ/dtheta_i           = sum_r w_r sum_{t < L_r} ([i_t = i] - p_ts [i_s = i])
        d2Q/dtheta_i dtheta_j = - sum_r w_r sum_{t < L_r} (p_ti [i = j] - p_ti p_tj).
    The stage sums are prefix sums over t <= min(slot_i, slot_j, L_r - 1) of 1 / S_t and
    1 / S_t^2, so a record costs O(m^2), not O(L m^2). One type per thread: the same sums
    for any thread count.
    """
    K, n_items = log_worths.shape
    value = np.zeros(K, dtype=np.float64)
    grad = np.zeros((K, n_items), dtype=np.float64)
    hess = np.zeros((K, n_items, n_items), dtype=np.float64)
    for k in numba.prange(K):
        value[k] = _pl_grad_hess_one(items, offsets, n_ranked, weights[k], log_worths[k], m_max,
                                     grad[k], hess[k])
    return value, grad, hess


# ----------------------------------------------------------------------------------------
# Initialisation: per-annotator ranking features and weighted k-means


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
