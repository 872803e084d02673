"""The tabular M-step for Plackett-Luce worths (Numba): weighted win counts, Hunter's MM step,
the weighted log-likelihood, and its gradient and Hessian for the Newton step. Functions take
and return arrays only; no fastmath (results must match the references exactly)."""

from __future__ import annotations

import functools
import os
import types

import numba
import numpy as np


# ----------------------------------------------------------------------------------------
# Fork safety. With its OpenMP threading layer Numba ends a child made by fork() from a process
# whose Numba threads had started, on the child's first parallel call ("fork() called from a
# process already using GNU OpenMP"); GNU OpenMP's threads do not survive fork(). Each
# parallel function below is therefore also compiled serially, and a forked child of such a
# process (or of such a child) runs the serial builds. Every type writes only its own row, so
# both builds give the same bits.


def _numba_threads_started() -> bool:
    try:
        from numba.np.ufunc import parallel
    except ImportError:  # pragma: no cover - another Numba layout: assume they have
        return True
    return bool(getattr(parallel, "_is_initialized", True))


_forked_after_threads = False


def _after_fork_in_child() -> None:
    global _forked_after_threads
    _forked_after_threads = _forked_after_threads or _numba_threads_started()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _over_types(fn):
    """Numba-compile ``fn`` (a ``numba.prange`` loop over types) in parallel, and serially
    for forked children (see above)."""
    parallel = numba.njit(cache=True, nogil=True, parallel=True)(fn)
    # The serial build compiles a copy under another name: Numba's on-disk cache is keyed by
    # the function's qualified name, not by the parallel flag.
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                              fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + "_serial"
    serial = numba.njit(cache=True, nogil=True)(copy)

    @functools.wraps(fn)
    def call(*args):
        return (serial if _forked_after_threads else parallel)(*args)

    call.parallel, call.serial = parallel, serial
    return call


# ----------------------------------------------------------------------------------------
# The stage sums of a type's records, shared by the MM step, the value and the Newton step


# What one pass of _pl_stage_sums over a type's records accumulates (a compile-time constant).
_VALUE, _NEWTON, _MM = 0, 1, 2


@numba.njit(cache=True, nogil=True)
def _pl_stage_sums(items, offsets, n_ranked, w, theta, m_max, what, out, hess):
    """One type's sums over its records, with worths scaled so that the largest is 1
    (gamma = exp(theta - max theta)):

    - ``what=_VALUE``: returns sum_r w_r ll_r(theta) (see pl_scaled_loglik);
    - ``_NEWTON``: returns it and adds its gradient into ``out`` and its Hessian into ``hess``
      (see pl_grad_hess);
    - ``_MM``: adds the MM denominators into ``out`` (see pl_mm_denominators); returns 0.

    All three are built from the same stage sums of each record: S_t, the worth still in play
    at stage t (suffix sums), and c1_j = sum_{t <= min(j, L-1)} 1 / S_t over the stages that
    have slot j in play. Slot j's item gets w_r c1_j in its MM denominator and -w_r gamma_j c1_j
    in its gradient, so the value, the Newton step and the MM step agree by construction.
    """
    # A compile-time constant (one build per value): each build holds only its own code and
    # runs as fast as a loop written for it alone (measured).
    numba.literally(what)
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
            gs = gamma[items[a + s]]
            if what == _NEWTON:
                g[s] = gs
            acc += gs
            suffix[s] = acc
        if what != _MM:
            ll = 0.0
            for t in range(L):
                ll += theta[items[a + t]]
            total += wr * (ll - L * top - _log_of_product(suffix, L))
        if what == _VALUE:
            continue
        run1 = 0.0
        run2 = 0.0
        for j in range(m):               # stages t <= min(j, L - 1) have slot j in play
            if j < L:
                inv = 1.0 / suffix[j]
                run1 += inv
                if what == _NEWTON:
                    run2 += inv * inv
                    out[items[a + j]] += wr
            if what == _MM:
                out[items[a + j]] += wr * run1
            else:
                c1[j] = run1
                c2[j] = run2
        if what == _MM:
            continue
        for j in range(m):
            ij = items[a + j]
            wg = wr * g[j]
            out[ij] -= wg * c1[j]
            # Slots q > j share the stages t <= min(j, L - 1): the c2[j] terms. Each pair is
            # added once, to whichever of (ij, iq), (iq, ij) comes first; the two triangles
            # are summed and mirrored at the end.
            hess[ij, ij] += wg * (g[j] * c2[j] - c1[j])
            for q in range(j + 1, m):
                hess[ij, items[a + q]] += wg * g[q] * c2[j]
    n = theta.shape[0] if what == _NEWTON else 0
    for i in range(n):
        for j in range(i + 1, n):
            x = hess[i, j] + hess[j, i]
            hess[i, j] = x
            hess[j, i] = x
    return total


# ----------------------------------------------------------------------------------------
# Weighted Plackett-Luce M-step: Hunter's (2004) minorization-maximization (MM) algorithm


@_over_types
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
def _pl_mm_update_one(wins, denom, theta, pseudo_count, out):
    """The MM update of one type from its wins and denominators (see pl_mm_step)."""
    n_items = theta.shape[0]
    top = theta.max()
    dummy = np.exp(-top)                 # the pseudo-count dummy item (worth 1) on that scale
    for i in range(n_items):
        gamma = np.exp(theta[i] - top)
        num = wins[i] + pseudo_count
        den = denom[i] + 2.0 * pseudo_count / (gamma + dummy)
        if den > 0.0 and num > 0.0:
            out[i] = np.log(num) - np.log(den) + top
        elif den > 0.0:
            out[i] = -np.inf             # chosen never, in play sometimes: MLE worth 0
        else:
            out[i] = theta[i]            # never in play, no pseudo-count: no information


@_over_types
def pl_mm_denominators(items, offsets, n_ranked, weights, log_worths, m_max):
    """(K, n_items) the MM denominators of pl_mm_step without the pseudo-count term:
    sum_r w_kr sum_{t < L_r, i in R_rt} 1 / sum_{s in R_rt} gamma_s, with worths scaled by
    the type's largest (gamma = exp(theta - max theta)). A sum over records: the shards of
    a distributed fit add theirs. One type per thread, each in its own row."""
    K, n_items = log_worths.shape
    denom = np.zeros((K, n_items), dtype=np.float64)
    no_hess = np.zeros((0, 0), dtype=np.float64)
    for k in numba.prange(K):
        _pl_stage_sums(items, offsets, n_ranked, weights[k], log_worths[k], m_max, _MM,
                       denom[k], no_hess)
    return denom


@_over_types
def pl_mm_update(wins, denom, log_worths, pseudo_count):
    """(K, n_items) new log-worths of one MM step from the (summed) wins and denominators."""
    K, n_items = log_worths.shape
    out = np.empty_like(log_worths)
    for k in numba.prange(K):
        _pl_mm_update_one(wins[k], denom[k], log_worths[k], pseudo_count, out[k])
    return out


def pl_mm_step(items, offsets, n_ranked, weights, wins, log_worths, pseudo_count, m_max):
    """One monotone MM update of the K Plackett-Luce log-worth vectors (Hunter 2004).

    For type k with worths gamma = exp(theta) and record weights w_r = weights[k, r]:
        gamma_i <- (wins_i + c) / ( sum_r w_r sum_{t < L_r, i in R_rt} 1 / sum_{s in R_rt} gamma_s
                                    + 2 c / (gamma_i + 1) )
    where R_rt is the set of items still in play at stage t of record r (slots t..m_r-1) and
    c = pseudo_count: c virtual wins and c virtual losses of each item against a dummy item of
    fixed worth 1. This is exactly Hunter's MM on the data plus the virtual comparisons, so it
    never decreases  sum_r w_r ll_r(theta) + c * sum_i (theta_i - 2 log(1 + exp theta_i)).
    The record sums (wins, :func:`pl_mm_denominators`) and the update (:func:`pl_mm_update`)
    are separate so that a distributed fit can sum the records' part over its ranks. Types
    are independent, each in its own row: the result does not depend on the thread count.
    """
    denom = pl_mm_denominators(items, offsets, n_ranked, weights, log_worths, m_max)
    return pl_mm_update(wins, denom, log_worths, pseudo_count)


@_over_types
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


@_over_types
def pl_scaled_loglik(items, offsets, n_ranked, weights, log_worths, m_max):
    """(K,) sum_r weights[k, r] * ll_r(log_worths[k]), like :func:`pl_weighted_loglik`, but
    from worths scaled so that the largest is 1 (one exp per item, one log per stage instead
    of a log-sum-exp per slot: several times faster). Accurate to rounding while the
    log-worths of a type span less than about 700 (the tabular family keeps them so); beyond
    that, worths underflow to 0 and a chosen item of worth 0 gives -inf."""
    K = log_worths.shape[0]
    out = np.zeros(K, dtype=np.float64)
    no_grad = np.zeros(0, dtype=np.float64)
    no_hess = np.zeros((0, 0), dtype=np.float64)
    for k in numba.prange(K):
        out[k] = _pl_stage_sums(items, offsets, n_ranked, weights[k], log_worths[k], m_max,
                                _VALUE, no_grad, no_hess)
    return out


@_over_types
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
        value[k] = _pl_stage_sums(items, offsets, n_ranked, weights[k], log_worths[k], m_max,
                                  _NEWTON, grad[k], hess[k])
    return value, grad, hess


