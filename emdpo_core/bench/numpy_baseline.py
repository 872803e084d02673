"""NumPy baselines the benchmarks measure against (``emdpo bench``, benchmarks/bench_em.py).

  e_step_python_loop   the authors' style: a Python loop over annotators, their records and
                       the types, NumPy on each small list. The slow baseline, run at a small
                       size only.
  regret_matrix        vectorized NumPy: one np.add.reduceat pass over the samples.
  em_e_step, em_mm_step, em_bookkeeping, em_iterations
                       one EM iteration of a tabular Plackett-Luce mixture (the E-step, the
                       mixture weights and M-step weights, Hunter's MM step), vectorized over
                       records of one common length m.

Each computes what the package computes (the benchmarks check that before timing); none is a
test oracle (those are in _reference.py).

Example:
    >>> import numpy as np
    >>> from emdpo_core.bench import numpy_baseline as nb
    >>> p = np.log([[0.5, 0.3, 0.2]])
    >>> resp, ll = nb.e_step_python_loop(p, np.zeros(3), [0, 3], [0, 1], [0.0], beta=1.0)
    >>> round(ll, 4)   # log(0.5 / 1) + log(0.3 / 0.5)
    -1.204
"""

from __future__ import annotations

import numpy as np


def e_step_python_loop(policy_logps, ref_logps, offsets, annotator_offsets, log_weights, *,
                       beta, n_ranked=None):
    """E-step with a Python loop per annotator, per record, per type (the authors' style).

    For annotator h: S_hk = sum over its records i of ll_ik, each ll_ik from NumPy on the
    record's slots; then g_h = softmax_k(log_weights_k + S_hk). policy_logps (K, M),
    ref_logps (M,), offsets (N+1,), annotator_offsets (H+1,), log_weights (K,).
    Returns (responsibilities (H, K), loglik float).
    """
    policy = np.asarray(policy_logps, dtype=np.float64)
    ref = np.asarray(ref_logps, dtype=np.float64)
    log_weights = np.asarray(log_weights, dtype=np.float64)
    K = policy.shape[0]
    H = len(annotator_offsets) - 1
    resp = np.empty((H, K))
    loglik = 0.0
    for h in range(H):
        S = np.zeros(K)
        for i in range(annotator_offsets[h], annotator_offsets[h + 1]):
            start, end = offsets[i], offsets[i + 1]
            L = end - start - 1 if n_ranked is None else n_ranked[i]
            for k in range(K):
                r = beta * (policy[k, start:end] - ref[start:end])
                suffix_lse = np.logaddexp.accumulate(r[::-1])[::-1]
                S[k] += np.sum(r[:L] - suffix_lse[:L])
        v = log_weights + S
        lse = np.logaddexp.reduce(v)
        resp[h] = np.exp(v - lse)
        loglik += lse
    return resp, float(loglik)


def regret_matrix(sample_logps, sample_ref_logps, source_offsets, *, beta, kind="reward"):
    """(K, K) regret matrix as ec.regret_matrix (unweighted samples), vectorized.

    B[k, j] = mean over the samples of policy j of d_k, d = sample_logps - ref ("reward") or
    sample_logps ("kl"); reward: R = beta * (diag(B)[:, None] - B); kl: R[k, j] =
    beta * (B[j, j] - B[k, j]). Every policy needs at least one sample (reduceat would
    silently return one element for an empty block).
    """
    so = np.asarray(source_offsets, dtype=np.int64)
    counts = np.diff(so)
    if np.any(counts < 1):
        raise ValueError("source_offsets: every policy needs at least one sample")
    lp = np.asarray(sample_logps)
    d = lp - sample_ref_logps if kind == "reward" else lp
    B = np.add.reduceat(d, so[:-1], axis=1, dtype=np.float64) / counts
    diag = np.diagonal(B)
    return beta * (diag[:, None] - B) if kind == "reward" else beta * (diag[None, :] - B)


# ----------------------------------------------------------------------------------------
# One EM iteration of a Plackett-Luce mixture, vectorized over records of one length m


def em_e_step(theta, items2d, n_ranked, annotator_offsets, log_weights):
    """(resp (H, K), loglik) for full or top-L lists of a common length m, in NumPy.
    theta (K, n_items) log-worths, items2d (N, m) items best first, n_ranked (N,) (one value)."""
    x = theta[:, items2d]                                          # (K, N, m)
    lse = np.logaddexp.accumulate(x[:, :, ::-1], axis=2)[:, :, ::-1]
    L = n_ranked[0]
    ll = (x[:, :, :L] - lse[:, :, :L]).sum(axis=2)                 # (K, N)
    S = np.add.reduceat(ll, annotator_offsets[:-1], axis=1).T      # (H, K)
    v = S + log_weights
    mx = v.max(axis=1, keepdims=True)
    lse_h = mx[:, 0] + np.log(np.exp(v - mx).sum(axis=1))
    return np.exp(v - lse_h[:, None]), float(lse_h.sum())


def em_mm_step(theta, items2d, n_ranked, W, c):
    """One MM step (same formula as _bookkeeping.pl_mm_step), vectorized. W (K, N) record
    weights, c the pseudo-count."""
    K, n = theta.shape
    L = n_ranked[0]
    top = theta.max(axis=1, keepdims=True)
    gamma = np.exp(theta - top)
    g = gamma[:, items2d]                                          # (K, N, m)
    suffix = np.cumsum(g[:, :, ::-1], axis=2)[:, :, ::-1]
    inv = np.zeros_like(suffix)
    inv[:, :, :L] = W[:, :, None] / suffix[:, :, :L]
    contrib = np.cumsum(inv, axis=2)                               # stages t <= j
    wins = np.zeros((K, n))
    denom = np.zeros((K, n))
    for k in range(K):
        wins[k] = np.bincount(items2d[:, :L].ravel(), weights=np.repeat(W[k], L), minlength=n)
        denom[k] = np.bincount(items2d.ravel(), weights=contrib[k].ravel(), minlength=n)
    dummy = np.exp(-top)
    return np.log(wins + c) - np.log(denom + 2 * c / (gamma + dummy)) + top


def em_bookkeeping(resp, annotator_offsets, alpha=1.0):
    """Mixture weights eta (K,) and M-step record weights W (K, N) from resp (H, K)."""
    eta = (resp.sum(axis=0) + alpha - 1) / (resp.shape[0] + resp.shape[1] * (alpha - 1))
    W = np.repeat(resp, np.diff(annotator_offsets), axis=0).T.copy()
    return eta, W


def em_iterations(theta, log_weights, items2d, n_ranked, annotator_offsets, c, n_iter):
    """n_iter EM iterations (E-step, bookkeeping, one MM step) from theta, log_weights.
    Returns (theta, log_weights, loglik of the last E-step)."""
    loglik = -np.inf
    for _ in range(n_iter):
        resp, loglik = em_e_step(theta, items2d, n_ranked, annotator_offsets, log_weights)
        eta, W = em_bookkeeping(resp, annotator_offsets)
        theta = em_mm_step(theta, items2d, n_ranked, W, c)
        with np.errstate(divide="ignore"):
            log_weights = np.log(eta)
    return theta, log_weights, loglik
