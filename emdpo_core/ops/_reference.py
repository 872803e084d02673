"""Plain float64 NumPy references: the oracle for tests and benchmarks.

Written for clarity, not speed: one record at a time, straight from the formulas of
docs/math.md, with no shared code with the compiled kernels. The gradient uses the
direct O(m^2) form (a sum of softmaxes over the suffixes), not the kernels' O(m) recurrence.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "listwise_loglik",
    "e_step",
    "e_step_type_totals",
    "listwise_dpo_loss_and_grad",
    "group_by_annotator",
    "regret_matrix",
]


def _logsumexp(x: np.ndarray) -> float:
    mx = np.max(x)
    return float(mx + np.log(np.sum(np.exp(x - mx))))


def _weighted(w, x):
    """w * x elementwise, exactly 0 where w == 0: a weight of 0 means the term contributes
    nothing, also when x is infinite (0 * -inf would be NaN)."""
    w, x = np.broadcast_arrays(np.asarray(w, np.float64), np.asarray(x, np.float64))
    out = np.zeros(w.shape)
    np.multiply(w, x, out=out, where=w != 0)
    return out


def _as_2d(policy_logps):
    p = np.asarray(policy_logps, dtype=np.float64)
    return p[None, :] if p.ndim == 1 else p


def _ranked(n_ranked, offsets, i):
    m = int(offsets[i + 1] - offsets[i])
    return m - 1 if n_ranked is None else int(n_ranked[i])


def record_loglik(rewards: np.ndarray, n_ranked: int) -> float:
    """Plackett-Luce log-likelihood of one best-first list of rewards, top-L observed."""
    r = np.asarray(rewards, dtype=np.float64)
    return float(sum(r[t] - _logsumexp(r[t:]) for t in range(n_ranked)))


def record_loglik_grad_rewards(rewards: np.ndarray, n_ranked: int) -> np.ndarray:
    """d ll / d r_j = [j < L] - sum_{t <= min(j, L-1)} softmax(r[t:])_j."""
    r = np.asarray(rewards, dtype=np.float64)
    g = np.zeros_like(r)
    for t in range(n_ranked):
        g[t] += 1.0
        sm = np.exp(r[t:] - _logsumexp(r[t:]))
        g[t:] -= sm
    return g


def listwise_loglik(policy_logps, ref_logps, offsets, *, beta, n_ranked=None):
    """(N, K) log-likelihood of each record under each type."""
    p = _as_2d(policy_logps)
    ref = np.asarray(ref_logps, dtype=np.float64)
    offsets = np.asarray(offsets)
    N, K = len(offsets) - 1, p.shape[0]
    out = np.empty((N, K))
    for i in range(N):
        a, b = offsets[i], offsets[i + 1]
        L = _ranked(n_ranked, offsets, i)
        for k in range(K):
            out[i, k] = record_loglik(beta * (p[k, a:b] - ref[a:b]), L)
    return out


def e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights, *, beta,
           n_ranked=None, record_weights=None, annotator_weights=None):
    """Returns (responsibilities (H, K), loglik, annotator_loglik (H, K)).

    loglik = sum_h v_h logsumexp_k (log eta_k + S_hk) with annotator weights v (default 1);
    the responsibilities do not depend on v.
    """
    ll = listwise_loglik(policy_logps, ref_logps, offsets, beta=beta, n_ranked=n_ranked)
    N, K = ll.shape
    c = np.ones(N) if record_weights is None else np.asarray(record_weights, np.float64)
    ao = np.asarray(annotator_offsets)
    H = len(ao) - 1
    lw = np.asarray(log_weights, dtype=np.float64)
    S = np.zeros((H, K))
    for h in range(H):
        S[h] = _weighted(c[ao[h]:ao[h + 1], None], ll[ao[h]:ao[h + 1]]).sum(axis=0)
    v = lw[None, :] + S
    lse = np.array([_logsumexp(row) for row in v])
    # Relative to each row's largest term: exp(v - lse) would lose log z at |v| >~ 1e16.
    d = v - v.max(axis=1, keepdims=True)
    resp = np.exp(d - np.log(np.exp(d).sum(axis=1, keepdims=True)))
    aw = np.ones(H) if annotator_weights is None else np.asarray(annotator_weights, np.float64)
    return resp, float(_weighted(aw, lse).sum()), S


def e_step_type_totals(responsibilities, annotator_weights=None):
    """(K,) sum_h v_h g_hk: the weighted type counts the M-step of the mixture weights uses."""
    g = np.asarray(responsibilities, dtype=np.float64)
    aw = np.ones(g.shape[0]) if annotator_weights is None else np.asarray(annotator_weights,
                                                                           np.float64)
    return (aw[:, None] * g).sum(axis=0)


def listwise_dpo_loss_and_grad(policy_logps, ref_logps, offsets, weights=None, *, beta,
                               n_ranked=None, reduction="sum"):
    """Loss and gradient with respect to the policy log-probabilities (same shape).

    policy_logps (M,) or (K, M); weights (N,) or (K, N). loss = sum_k scale_k sum_i
    w_ki (-ll_ki), scale = 1 ("sum"), 1/N ("mean"), 1/sum_i w_ki ("weighted_mean");
    "none" returns the per-record losses w_ki (-ll_ki) and the gradient of their sum.
    """
    one = np.asarray(policy_logps).ndim == 1
    p = _as_2d(policy_logps)
    ref = np.asarray(ref_logps, dtype=np.float64)
    offsets = np.asarray(offsets)
    K, N = p.shape[0], len(offsets) - 1
    w = np.ones((K, N)) if weights is None else np.asarray(weights, np.float64).reshape(K, N)
    if reduction in ("sum", "none"):
        scale = np.ones(K)
    elif reduction == "mean":
        scale = np.full(K, 1.0 / N)
    elif reduction == "weighted_mean":
        # 1 / sum_i w_ki overflows for weights of 1e-310, and the sum itself for weights near
        # 1e308: the loss does not change when a type's weights are scaled, so scale them to
        # a largest magnitude of 1 first (a power of two would do as well; any factor is exact
        # enough for an oracle at 1e-10).
        top = np.abs(w).max(axis=1, keepdims=True)
        w = w / np.where(top > 0, top, 1.0)
        totals = w.sum(axis=1)
        bad = np.flatnonzero(~(totals > 0))
        if bad.size:
            raise ValueError(f"weights: reduction='weighted_mean' needs a positive sum of "
                             f"weights for every type; type {bad[0]} sums to "
                             f"{totals[bad[0]] * top[bad[0], 0]}")
        scale = 1.0 / totals
    else:
        raise ValueError(reduction)
    per_record = np.zeros((K, N))
    grad = np.zeros_like(p)
    for k in range(K):
        for i in range(N):
            a, b = offsets[i], offsets[i + 1]
            L = _ranked(n_ranked, offsets, i)
            r = beta * (p[k, a:b] - ref[a:b])
            if w[k, i] == 0:  # contributes exactly nothing, also where ll = -inf
                continue
            per_record[k, i] = -w[k, i] * record_loglik(r, L)
            grad[k, a:b] = -scale[k] * w[k, i] * beta * record_loglik_grad_rewards(r, L)
    if one:
        grad = grad[0]
    if reduction == "none":
        return (per_record[0] if one else per_record), grad
    return float((scale * per_record.sum(axis=1)).sum()), grad


def group_by_annotator(annotator_ids, n_annotators=None):
    """Stable grouping: (order, annotator_offsets)."""
    ids = np.asarray(annotator_ids, dtype=np.int64)
    H = int(ids.max()) + 1 if n_annotators is None else int(n_annotators)
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids, minlength=H)
    return order, np.concatenate([[0], np.cumsum(counts)])


def regret_matrix(sample_logps, sample_ref_logps, source_offsets, *, beta, kind="reward",
                  sample_weights=None):
    """R[k, j]: regret of type k served by policy j (docs/math.md, MMRA)."""
    lp = np.asarray(sample_logps, dtype=np.float64)
    ref = np.asarray(sample_ref_logps, dtype=np.float64)
    so = np.asarray(source_offsets)
    K = lp.shape[0]
    S = lp.shape[1]
    sw = np.ones(S) if sample_weights is None else np.asarray(sample_weights, np.float64)
    R = np.zeros((K, K))
    if kind == "reward":
        A = np.zeros((K, K))
        for j in range(K):
            s = slice(so[j], so[j + 1])
            for k in range(K):
                A[k, j] = np.average(lp[k, s] - ref[s], weights=sw[s])
        for k in range(K):
            R[k] = beta * (A[k, k] - A[k])
    elif kind == "kl":
        for j in range(K):
            s = slice(so[j], so[j + 1])
            for k in range(K):
                R[k, j] = beta * np.average(lp[j, s] - lp[k, s], weights=sw[s])
    else:
        raise ValueError(kind)
    return R
