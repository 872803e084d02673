"""CPU launches of the compiled ops on checked arrays, and the error reports for the
non-finite inputs the kernels find. The NumPy entry points call these after checking their
arguments; the torch entry points call them on zero-copy NumPy views of CPU tensors (so each
input is checked once, by the entry point it came in through). Also the E-step's result type,
which both paths return."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .. import _core


class EStepResult(NamedTuple):
    """Result of :func:`e_step`.

    responsibilities: (H, K) posterior of each annotator over types, rows sum to 1.
    loglik: observed-data log-likelihood, sum_h v_h logsumexp_k (log eta_k + S_hk), with
        annotator weights v (default 1).
    annotator_loglik: (H, K) S_hk = sum over the annotator's records of c_i * ll_ik.
    record_loglik: (N, K) per-record log-likelihoods when asked for, else None.
    type_totals: (K,) float64 sum_h v_h g_hk, summed in annotator order (the mixture
        weights' sufficient statistic), on the input's device.
    """

    responsibilities: object
    loglik: float
    annotator_loglik: object
    record_loglik: object = None
    type_totals: object = None


def raise_non_finite(bad: int, p: np.ndarray, ref: np.ndarray, offsets: np.ndarray, beta: float):
    a, b = int(offsets[bad]), int(offsets[bad + 1])
    if not np.all(np.isfinite(ref[a:b])):
        j = a + int(np.argmin(np.isfinite(ref[a:b])))
        raise ValueError(
            f"ref_logps: non-finite value {ref[j]} at slot {j} (record {bad}); log-probabilities "
            f"must be finite")
    for k in range(p.shape[0]):
        if not np.all(np.isfinite(p[k, a:b])):
            j = a + int(np.argmin(np.isfinite(p[k, a:b])))
            raise ValueError(
                f"policy_logps: non-finite value {p[k, j]} at [type {k}, slot {j}] (record {bad}); "
                f"log-probabilities must be finite")
    raise ValueError(
        f"policy_logps/ref_logps: the reward beta * (logpi - logpi_ref) overflows in record {bad} "
        f"(beta={beta}); rescale the log-probabilities or beta")


def listwise_loglik(p, ref, offsets, nr, beta):
    K, M = p.shape
    N = offsets.shape[0] - 1
    out = np.empty((N, K), dtype=p.dtype)
    bad = _core.listwise_loglik(p, ref, offsets, nr, N, M, K, beta, out)
    if bad >= 0:
        raise_non_finite(bad, p, ref, offsets, beta)
    return out


def e_step(p, ref, offsets, nr, ao, lw, cw, v, beta, return_record_loglik):
    K, M = p.shape
    N, H = offsets.shape[0] - 1, ao.shape[0] - 1
    resp = np.empty((H, K), dtype=p.dtype)
    annot_ll = np.empty((H, K), dtype=p.dtype)
    rec = np.empty((N, K), dtype=p.dtype) if return_record_loglik else None
    totals = np.empty(K, dtype=np.float64)
    bad, loglik = _core.e_step(p, ref, offsets, nr, cw, ao, lw, N, M, K, H, beta, resp,
                               annot_ll, rec, annotator_weights=v, type_totals=totals)
    if bad >= 0:
        raise_non_finite(bad, p, ref, offsets, beta)
    return EStepResult(resp, float(loglik), annot_ll, rec, totals)


def weighted_mean_weights(w: np.ndarray, K: int, N: int):
    """(weights, scale) for reduction="weighted_mean" with explicit weights w (K, N).

    The loss is invariant to scaling a type's weights, so each row is divided by its largest
    magnitude (in float64) before the sum: the sum is then >= 1 for non-negative weights, and
    1 / sum neither overflows (weights of 1e-320) nor leaves float32's range when the kernel
    rounds it (a nearly collapsed type's float32 responsibilities, 1e-45)."""
    top = np.abs(w).max(axis=1, keepdims=True).astype(np.float64)
    top[top == 0] = 1.0  # an all-zero type stays zero, and is refused below
    w = np.ascontiguousarray(w / top, dtype=w.dtype)
    # Signs from the rescaled sums: the raw sum of weights near 1e308 overflows.
    totals = w.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(~(totals > 0))
    if bad.size:
        raise ValueError(
            f"weights: reduction='weighted_mean' needs a positive sum of weights for every type; "
            f"type {bad[0]} sums to {totals[bad[0]] * top[bad[0], 0]}")
    return w, 1.0 / totals


def loss_scale(reduction: str, w: Optional[np.ndarray], K: int, N: int) -> np.ndarray:
    """scale_k of the loss; for "weighted_mean" with weights, see weighted_mean_weights."""
    if reduction in ("sum", "none"):
        return np.ones(K)
    if reduction == "mean" or w is None:
        return np.full(K, 1.0 / N)
    return weighted_mean_weights(w, K, N)[1]


def listwise_dpo_loss_and_grad(p, ref, offsets, nr, w, reduction, beta):
    """(loss, grad) with grad (K, M) and, for reduction "none", loss (K, N)."""
    K, M = p.shape
    N = offsets.shape[0] - 1
    if reduction == "weighted_mean" and w is not None:
        w, scale = weighted_mean_weights(w, K, N)
    else:
        scale = loss_scale(reduction, w, K, N)
    grad = np.empty((K, M), dtype=p.dtype)
    rec = np.empty((K, N), dtype=p.dtype) if reduction == "none" else None
    bad, loss = _core.listwise_dpo_loss_and_grad(p, ref, offsets, nr, w, scale, N, M, K, beta,
                                                 grad, rec)
    if bad >= 0:
        raise_non_finite(bad, p, ref, offsets, beta)
    return (rec if reduction == "none" else float(loss)), grad


def raise_regret_non_finite(lp, ref, so, beta):
    """Error path: find the first non-finite input, else report an overflow."""
    K, S = lp.shape
    rows, cols = np.nonzero(~np.isfinite(lp))
    if rows.size:
        first = int(np.argmin(cols * K + rows))  # first sample, then first type
        k, s = int(rows[first]), int(cols[first])
        j = int(np.searchsorted(so, s, side="right") - 1)
        raise ValueError(
            f"sample_logps: non-finite value {lp[k, s]} at [type {k}, sample {s}] (a sample of "
            f"policy {j}); log-probabilities must be finite (a -inf means type {k}'s policy gives "
            f"zero probability to a sample of policy {j}, so its regret is infinite)")
    if ref is not None:
        bad = np.flatnonzero(~np.isfinite(ref))
        if bad.size:
            s = int(bad[0])
            raise ValueError(f"sample_ref_logps: non-finite value {ref[s]} at sample {s}; "
                             f"log-probabilities must be finite")
    raise ValueError(f"sample_logps: the regret sums overflow float64 (beta={beta}, largest "
                     f"|log-probability| {float(np.max(np.abs(lp))):.3g}); rescale the "
                     f"log-probabilities or beta")


def regret_matrix(lp, ref, so, sw, kind_code, beta):
    """The CPU launch on checked arrays (the torch entry point calls it for CPU tensors)."""
    K, S = lp.shape
    R = np.empty((K, K), dtype=np.float64)
    bad = _core.regret_matrix(lp, ref, so, sw, K, S, kind_code, beta, R)
    if bad >= 0:
        raise_regret_non_finite(lp, ref, so, beta)
    return R
