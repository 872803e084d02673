"""Numba routines for the EM engine's mixture bookkeeping: per-record M-step weights
w_ik = c_i v_{a_i} g_{a_i k}, mixture weights eta from the responsibilities, and the weighted
observed-data log-likelihood. No fastmath (results must match the references exactly)."""

from __future__ import annotations

import numba
import numpy as np


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
def type_totals(responsibilities, annotator_weight):
    """(K,) sum_h v_h g_hk: each type's share of the annotators (a sum over annotators: the
    shards of a distributed fit add theirs), summed in annotator order as the kernel does."""
    H, K = responsibilities.shape
    totals = np.zeros(K, dtype=np.float64)
    for h in range(H):
        v = annotator_weight[h]
        for k in range(K):
            totals[k] += v * responsibilities[h, k]
    return totals


@numba.njit(cache=True, nogil=True)
def _dirichlet_map(totals, alpha):
    """MAP mixture weights under a symmetric Dirichlet(alpha) prior, alpha >= 1, from the type
    totals t_k = sum_h v_h g_hk (overwritten):
    eta_k = (t_k + alpha - 1) / (sum_j t_j + K (alpha - 1)).
    Numerator and denominator are divided by s = max(1, alpha - 1) first, so that a huge
    alpha (up to the largest float) gives weights near 1/K instead of inf / inf; for
    alpha <= 2 (s = 1) the arithmetic is the plain formula's."""
    K = totals.shape[0]
    a = alpha - 1.0
    s = a if a > 1.0 else 1.0
    denom = 0.0
    for k in range(K):
        totals[k] = totals[k] / s + a / s if s != 1.0 else totals[k] + a
        denom += totals[k]
    for k in range(K):
        totals[k] /= denom
    return totals


@numba.njit(cache=True, nogil=True)
def mixture_weights(responsibilities, annotator_weight, alpha):
    """MAP mixture weights (see :func:`_dirichlet_map`) from the responsibilities (H, K)."""
    return _dirichlet_map(type_totals(responsibilities, annotator_weight), alpha)


def weights_from_totals(totals, alpha):
    """:func:`mixture_weights` from the type totals sum_h v_h g_hk the E-step kernel returns
    (the same sums, in the same annotator order, so the same weights)."""
    return _dirichlet_map(np.array(totals, dtype=np.float64).reshape(-1), float(alpha))


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
