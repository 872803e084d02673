"""Validation and dispatch of NumPy and torch (CPU or CUDA) inputs to the compiled kernels.

Every public function here checks its arguments before anything crosses into C++ and raises
ValueError/TypeError naming the argument, what was expected and what was given (with the
first offending index for array contents). Checks that would need an extra pass over the big
log-probability arrays (finiteness) happen inside the fused kernels, which report the first
record with a non-finite reward; the message then names the array and slot.

NumPy arrays run on the CPU kernels. torch CPU tensors run on the CPU kernels too (zero
copy) and come back as tensors; torch CUDA tensors run on the CUDA kernels on the current
stream.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from .. import _core

__all__ = [
    "EStepResult",
    "listwise_loglik",
    "e_step",
    "listwise_dpo_loss_and_grad",
    "REDUCTIONS",
]

REDUCTIONS = ("sum", "mean", "weighted_mean", "none")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class EStepResult(NamedTuple):
    """Result of :func:`e_step`.

    responsibilities: (H, K) posterior of each annotator over types, rows sum to 1.
    loglik: observed-data log-likelihood, sum_h logsumexp_k (log eta_k + S_hk).
    annotator_loglik: (H, K) S_hk = sum over the annotator's records of c_i * ll_ik.
    record_loglik: (N, K) per-record log-likelihoods when asked for, else None.
    """

    responsibilities: object
    loglik: float
    annotator_loglik: object
    record_loglik: object = None


# ----------------------------------------------------------------------------------------
# Small helpers


def _is_torch(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and type(x).__name__ in ("Tensor", "Parameter")


def _describe(x) -> str:
    if _is_torch(x):
        return f"torch tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise TypeError(f"beta: expected a positive real number, got {type(beta).__name__}")
    b = float(beta)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta: expected a finite number > 0, got {b!r}")
    return b


def _float_array(x, name: str, ndims=(1,)) -> np.ndarray:
    """A C-contiguous float32/float64 array (no copy when already one)."""
    if _is_torch(x):
        raise TypeError(f"{name}: got a {_describe(x)}; mix of torch and NumPy inputs")
    a = np.asarray(x)
    if a.dtype not in _FLOAT_DTYPES:
        if a.dtype.kind in "iub" or a.dtype == object or a.dtype.kind in "USV":
            raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {a.dtype}")
        if a.dtype.kind == "f":  # float16 / longdouble: compute in float64 or float32
            a = a.astype(np.float32 if a.dtype.itemsize < 4 else np.float64)
        else:
            raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {a.dtype}")
    if a.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected a {want} array, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _index_array(x, name: str) -> np.ndarray:
    """A C-contiguous int64 1-D array; int32 and other integer types are converted."""
    if _is_torch(x):
        raise TypeError(f"{name}: got a {_describe(x)}; mix of torch and NumPy inputs")
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            pass  # integral floats (e.g. from JSON) are accepted
        elif a.size:
            raise TypeError(f"{name}: expected an integer array (int64), got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: values exceed int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def _check_offsets(offsets: np.ndarray, M: int) -> int:
    """Record offsets: (N+1,), 0 first, M last, every list at least 2 long. Returns N."""
    if offsets.shape[0] < 2:
        raise ValueError(
            f"offsets: expected at least 2 entries (N+1 for N >= 1 records), got "
            f"{offsets.shape[0]}; there are no records")
    bad = _core.first_bad_offset(offsets, M, 2)
    if bad >= 0:
        if bad == 0 and offsets[0] != 0:
            raise ValueError(f"offsets: expected offsets[0] == 0, got {offsets[0]}")
        if offsets[bad] > M:
            raise ValueError(
                f"offsets: entry {bad} is {offsets[bad]}, beyond the number of slots M={M}")
        if bad == offsets.shape[0] - 1 and offsets[bad] != M and offsets[bad] >= offsets[bad - 1] + 2:
            raise ValueError(
                f"offsets: expected offsets[-1] == M == {M} (the number of slots), "
                f"got {offsets[-1]}")
        raise ValueError(
            f"offsets: every list needs at least 2 responses, so offsets must increase by >= 2; "
            f"record {bad - 1} spans offsets[{bad - 1}]={offsets[bad - 1]} to "
            f"offsets[{bad}]={offsets[bad]}")
    return offsets.shape[0] - 1


def _check_n_ranked(n_ranked, offsets: np.ndarray, N: int) -> Optional[np.ndarray]:
    if n_ranked is None:
        return None
    nr = _index_array(n_ranked, "n_ranked")
    if nr.shape[0] != N:
        raise ValueError(f"n_ranked: expected {N} entries (one per record), got {nr.shape[0]}")
    bad = _core.first_bad_n_ranked(nr, offsets)
    if bad >= 0:
        m = offsets[bad + 1] - offsets[bad]
        raise ValueError(
            f"n_ranked: expected 1 <= n_ranked[i] <= m_i - 1; record {bad} has m={m} "
            f"responses and n_ranked={nr[bad]}")
    return nr


def _policy_and_ref(policy_logps, ref_logps):
    p = _float_array(policy_logps, "policy_logps", ndims=(1, 2))
    one = p.ndim == 1
    if one:
        p = p[None, :]
    if p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"policy_logps: expected shape (K, M) with K >= 1 and M >= 2, got {p.shape}")
    ref = _float_array(ref_logps, "ref_logps")
    if ref.shape[0] != p.shape[1]:
        raise ValueError(
            f"ref_logps: expected shape ({p.shape[1]},) to match policy_logps' M={p.shape[1]}, "
            f"got {ref.shape}")
    if ref.dtype != p.dtype:
        raise TypeError(
            f"ref_logps: dtype {ref.dtype} does not match policy_logps' dtype {p.dtype}; "
            f"pass both as float32 or both as float64")
    return p, ref, one


def _raise_non_finite(bad: int, p: np.ndarray, ref: np.ndarray, offsets: np.ndarray, beta: float):
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


# ----------------------------------------------------------------------------------------
# Public kernels


def listwise_loglik(policy_logps, ref_logps, offsets, *, beta, n_ranked=None):
    """Per-record, per-type Plackett-Luce log-likelihoods.

    ll_ik = sum_{t < L_i} (r_kt - logsumexp_{s >= t} r_ks), r_kj = beta (logpi_k - logpi_ref).

    Args:
        policy_logps: (K, M) or (M,) sequence log-probabilities, float32 or float64; slots of
            record i are offsets[i]:offsets[i+1], best first.
        ref_logps: (M,) reference log-probabilities, same dtype.
        offsets: (N+1,) integer record offsets.
        beta: DPO temperature, > 0.
        n_ranked: (N,) observed ranking depth L_i in [1, m_i - 1]; default full rankings.

    Returns:
        (N, K) array (or torch tensor for torch input) in the input dtype.
    """
    if _is_torch(policy_logps):
        from . import _torch

        return _torch.listwise_loglik(policy_logps, ref_logps, offsets, beta=beta,
                                              n_ranked=n_ranked)
    beta = _check_beta(beta)
    p, ref, _ = _policy_and_ref(policy_logps, ref_logps)
    offsets = _index_array(offsets, "offsets")
    K, M = p.shape
    N = _check_offsets(offsets, M)
    nr = _check_n_ranked(n_ranked, offsets, N)
    out = np.empty((N, K), dtype=p.dtype)
    bad = _core.listwise_loglik(p, ref, offsets, nr, N, M, K, beta, out)
    if bad >= 0:
        _raise_non_finite(bad, p, ref, offsets, beta)
    return out


def _check_annotator_offsets(annotator_offsets, N: int) -> np.ndarray:
    ao = _index_array(annotator_offsets, "annotator_offsets")
    if ao.shape[0] < 2:
        raise ValueError(
            f"annotator_offsets: expected H+1 >= 2 entries, got {ao.shape[0]}")
    bad = _core.first_bad_offset(ao, N, 0)
    if bad >= 0:
        if bad == 0:
            raise ValueError(f"annotator_offsets: expected annotator_offsets[0] == 0, got {ao[0]}")
        if ao[bad] < ao[bad - 1]:
            raise ValueError(
                f"annotator_offsets: must be non-decreasing; entry {bad} is {ao[bad]} < "
                f"entry {bad - 1} = {ao[bad - 1]}")
        raise ValueError(
            f"annotator_offsets: must cover the records 0..N with N={N}; entry {bad} is {ao[bad]} "
            f"(the last entry must equal N)")
    return ao


def _check_log_weights(log_weights, K: int) -> np.ndarray:
    if _is_torch(log_weights):
        log_weights = log_weights.detach().cpu().numpy()
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1) if np.ndim(log_weights) <= 1 else None
    if lw is None:
        raise ValueError(f"log_weights: expected shape ({K},), got {np.shape(log_weights)}")
    if lw.shape[0] != K:
        raise ValueError(f"log_weights: expected shape ({K},) (one per type), got {lw.shape}")
    bad = np.flatnonzero(np.isnan(lw) | (lw == np.inf))
    if bad.size:
        raise ValueError(
            f"log_weights: expected finite values or -inf, got {lw[bad[0]]} at index {bad[0]}")
    if not np.any(np.isfinite(lw)):
        raise ValueError("log_weights: every type has weight zero (all -inf)")
    return np.ascontiguousarray(lw)


def _real_vector(x, name: str, size: int, per: str, dtype=np.float64) -> np.ndarray:
    """A C-contiguous (size,) array of real numbers (a torch tensor is copied to the host);
    TypeError/ValueError naming the argument otherwise. Value checks stay with the caller."""
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected real numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=dtype)
    if a.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},) (one per {per}), got {a.shape}")
    return a


def _check_record_weights(w, N: int, dtype, name="record_weights") -> Optional[np.ndarray]:
    if w is None:
        return None
    a = _real_vector(w, name, N, "record", dtype)
    bad = np.flatnonzero(~np.isfinite(a) | (a < 0))
    if bad.size:
        raise ValueError(
            f"{name}: expected finite values >= 0, got {a[bad[0]]} at index {bad[0]}")
    return a


def e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights, *, beta,
           n_ranked=None, record_weights=None, return_record_loglik=False) -> EStepResult:
    """Fused E-step: per-record likelihoods, per-annotator sums, posteriors over types.

    Records must be grouped by annotator: records annotator_offsets[h]:annotator_offsets[h+1]
    belong to annotator h (see :func:`group_by_annotator`). With S_hk = sum_i c_i ll_ik:
        log g_hk = log eta_k + S_hk - logsumexp_j (log eta_j + S_hj),
        loglik  = sum_h logsumexp_k (log eta_k + S_hk).
    Reductions are deterministic (bitwise the same for any thread count). Extra memory is
    O(H + N/2048) beyond the outputs; the (N, K) per-record table is only made when
    ``return_record_loglik`` is true.

    Example:
        >>> import numpy as np, emdpo_core as ec
        >>> p = np.log(np.full((2, 6), 0.5)); ref = np.zeros(6)
        >>> r = ec.e_step(p, ref, [0, 3, 6], [0, 2], np.log([0.5, 0.5]), beta=1.0)
        >>> r.responsibilities.round(3).tolist()
        [[0.5, 0.5]]
    """
    if _is_torch(policy_logps):
        from . import _torch

        return _torch.e_step(policy_logps, ref_logps, offsets, annotator_offsets,
                                      log_weights, beta=beta, n_ranked=n_ranked,
                                      record_weights=record_weights,
                                      return_record_loglik=return_record_loglik)
    beta = _check_beta(beta)
    p, ref, _ = _policy_and_ref(policy_logps, ref_logps)
    offsets = _index_array(offsets, "offsets")
    K, M = p.shape
    N = _check_offsets(offsets, M)
    nr = _check_n_ranked(n_ranked, offsets, N)
    ao = _check_annotator_offsets(annotator_offsets, N)
    H = ao.shape[0] - 1
    lw = _check_log_weights(log_weights, K)
    cw = _check_record_weights(record_weights, N, p.dtype)
    resp = np.empty((H, K), dtype=p.dtype)
    annot_ll = np.empty((H, K), dtype=p.dtype)
    rec = np.empty((N, K), dtype=p.dtype) if return_record_loglik else None
    bad, loglik = _core.e_step(p, ref, offsets, nr, cw, ao, lw, N, M, K, H, beta, resp,
                               annot_ll, rec)
    if bad >= 0:
        _raise_non_finite(bad, p, ref, offsets, beta)
    return EStepResult(resp, float(loglik), annot_ll, rec)


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _loss_weights(weights, K: int, N: int, dtype, one: bool) -> Optional[np.ndarray]:
    if weights is None:
        return None
    if _is_torch(weights):
        raise TypeError(f"weights: got a {_describe(weights)}; mix of torch and NumPy inputs")
    a = np.asarray(weights)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"weights: expected real numbers, got dtype {a.dtype}")
    want = [(N,), (K, N)] if K == 1 else [(K, N)]
    if a.shape not in want:
        raise ValueError(
            f"weights: expected shape {' or '.join(map(str, want))} (per record"
            f"{'' if K == 1 else ', per type'}), got {a.shape}")
    a = np.ascontiguousarray(a.reshape(K, N), dtype=dtype)
    bad = np.flatnonzero(~np.isfinite(a.reshape(-1)))
    if bad.size:
        k, i = divmod(int(bad[0]), N)
        raise ValueError(f"weights: expected finite values, got {a[k, i]} at index "
                         f"{i if one else (k, i)}")
    return a


def _loss_scale(reduction: str, w: Optional[np.ndarray], K: int, N: int) -> np.ndarray:
    if reduction in ("sum", "none"):
        return np.ones(K)
    if reduction == "mean":
        return np.full(K, 1.0 / N)
    totals = np.full(K, float(N)) if w is None else w.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(~(totals > 0))
    if bad.size:
        raise ValueError(
            f"weights: reduction='weighted_mean' needs a positive sum of weights for every type; "
            f"type {bad[0]} sums to {totals[bad[0]]}")
    return 1.0 / totals


def listwise_dpo_loss_and_grad(policy_logps, ref_logps, offsets, weights=None, *, beta,
                               n_ranked=None, reduction="sum"):
    """Weighted listwise DPO loss and its gradient with respect to ``policy_logps``.

    loss = sum_k scale_k * sum_i w_ki * (-ll_ki), with scale_k = 1 ("sum"), 1/N ("mean") or
    1/sum_i w_ki ("weighted_mean"). With m=2, L=1 this is the standard DPO loss
    -log sigmoid(beta * ((pc - rc) - (pr - rr))). Loss and gradient come from one fused pass
    (a suffix log-sum-exp, then prefix sums): O(m) per record.

    Args:
        policy_logps: (M,) or (K, M) float32/float64.
        ref_logps: (M,).
        offsets: (N+1,).
        weights: (N,) (or (K, N) for K policies) per-record weights; default all ones.
        beta: > 0.
        n_ranked: (N,) ranking depths; default full rankings.
        reduction: "sum" | "mean" | "weighted_mean" | "none".

    Returns:
        (loss, grad): loss a float (for "none": the per-record losses w_i (-ll_i), shape (N,)
        or (K, N)), grad the same shape and dtype as policy_logps (for "none": the gradient of
        the sum of the per-record losses).
    """
    if _is_torch(policy_logps):
        from . import _torch

        return _torch.listwise_dpo_loss_and_grad(
            policy_logps, ref_logps, offsets, weights, beta=beta, n_ranked=n_ranked,
            reduction=reduction)
    beta = _check_beta(beta)
    reduction = _check_reduction(reduction)
    p, ref, one = _policy_and_ref(policy_logps, ref_logps)
    offsets = _index_array(offsets, "offsets")
    K, M = p.shape
    N = _check_offsets(offsets, M)
    nr = _check_n_ranked(n_ranked, offsets, N)
    w = _loss_weights(weights, K, N, p.dtype, one)
    scale = _loss_scale(reduction, w, K, N)
    grad = np.empty((K, M), dtype=p.dtype)
    rec = np.empty((K, N), dtype=p.dtype) if reduction == "none" else None
    bad, loss = _core.listwise_dpo_loss_and_grad(p, ref, offsets, nr, w, scale, N, M, K, beta,
                                                 grad, rec)
    if bad >= 0:
        _raise_non_finite(bad, p, ref, offsets, beta)
    if one:
        grad = grad[0]
    if reduction == "none":
        return (rec[0] if one else rec), grad
    return float(loss), grad
