"""MinMax Regret Aggregation (MMRA): one policy that leaves no annotator type far behind.

Given K type policies pi_1..pi_K (one per latent annotator type, from EM-DPO), MMRA picks
mixture weights w over the policies (a sequence-level mixture: draw policy j with probability
w_j, then generate the whole answer with it) minimizing the worst type's regret
(docs/math.md, MMRA):

    regret_matrix   R[k, j] = regret of type k when served by policy j, estimated from cached
                    samples of each policy (a compiled op, :mod:`emdpo_core.ops.regret`;
                    re-exported here).
    mmra            the linear program  min_w max_k c_k (R w)_k  over the simplex, solved
                    exactly with cvxpy (built once per K with Parameters, re-solved fast), or
                    with optimistic multiplicative weights (``solver="hedge"``, the method of
                    the authors' code) as a cross-check and baseline.
    mmra_exact      for finite response sets, the exact regret of the mixed policy,
                    max_k beta sum_c rho_c KL(sum_j w_j pi_j(.|c) || pi_k(.|c)), which is convex
                    in w (exponential cone).
    MixturePolicy   sampling a component per request: the mixture the LP assumes.

cvxpy is imported only inside the functions that solve (lazily), so ``import emdpo_core``
works without it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import warnings
from typing import NamedTuple

import numba
import numpy as np

from . import _checks
from .ops.regret import REGRET_KINDS, regret_matrix

__all__ = [
    "MMRAResult",
    "regret_matrix",
    "mmra",
    "mmra_exact",
    "MixturePolicy",
    "exact_mixture_regret",
    "REGRET_KINDS",
    "HEDGE_ITERATIONS",
]

HEDGE_ITERATIONS = 100_000  # the authors' code runs this many multiplicative-weights steps


class MMRAResult(NamedTuple):
    """Result of :func:`mmra` and :func:`mmra_exact`.

    weights: (K,) float64 mixture weights over the policies (non-negative, sum to 1).
    max_regret: the objective at ``weights``: max_k c_k regrets_k (c = group weights, default
        1), recomputed from the returned weights.
    regrets: (K,) float64 regret of each type under the mixture (unweighted by c): R @ weights
        for :func:`mmra`, the exact KL regret for :func:`mmra_exact`.
    status: the solver's status ("optimal", or "optimal_inaccurate" with a warning); for
        ``solver="hedge"`` "approximate (hedge, T iterations, duality gap <= g)", where g is a
        certified bound on max_regret minus the true optimum.
    """

    weights: np.ndarray
    max_regret: float
    regrets: np.ndarray
    status: str


def _clean_simplex(w, K: int) -> np.ndarray:
    """Solver output -> a probability vector (clip the solver's tiny negatives, renormalize)."""
    w = np.clip(np.asarray(w, dtype=np.float64).reshape(K), 0.0, None)
    total = w.sum()
    if not (np.isfinite(total) and total > 0):
        raise RuntimeError(f"mmra: the solver returned invalid weights {w!r}")
    return w / total


# ----------------------------------------------------------------------------------------
# The LP with cvxpy


def _import_cvxpy():
    try:
        import cvxpy as cp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "emdpo_core.mmra needs cvxpy for the exact solvers: pip install 'emdpo-core[mmra]' "
            "(or pip install cvxpy); solver='hedge' works without it") from e
    return cp


_highs_banner_lock = threading.Lock()
_highs_banner_done = False


def _silence_highs_banner():
    """HiGHS prints a copyright banner on the C-level stdout the first time a Highs object is
    made in a process, even with logging off. Make that first object here with stdout pointed
    at the null device, so solver output stays silent."""
    global _highs_banner_done
    with _highs_banner_lock:
        if _highs_banner_done:
            return
        _highs_banner_done = True
        try:
            import highspy
        except ImportError:  # pragma: no cover - HiGHS comes with cvxpy or scipy
            return
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):  # no usable fd 1: nothing to silence
            highspy.Highs()
            return
        # Process-wide for a moment: anything else written to fd 1 meanwhile is lost too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            highspy.Highs()
            try:  # flush C stdio buffers while they still point at the null device
                import ctypes

                ctypes.CDLL(None).fflush(None)
            except (OSError, AttributeError, TypeError):  # pragma: no cover - non-POSIX
                pass
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)


@functools.lru_cache(maxsize=1)
def _installed_solvers() -> tuple:
    # cvxpy probes every solver's import on each call (~1.5 ms, as long as a small LP solve).
    return tuple(_import_cvxpy().installed_solvers())


def _lp_solver(cp, solver):
    """The cvxpy solver name: HiGHS (exact simplex) when installed, else cvxpy's choice."""
    installed = list(_installed_solvers())
    if solver is None:
        if "HIGHS" in installed:
            _silence_highs_banner()
            return "HIGHS"
        return None
    if not isinstance(solver, str):
        raise TypeError(f"solver: expected None, 'hedge' or a cvxpy solver name, got "
                        f"{type(solver).__name__}")
    name = solver.upper()
    if name not in installed:
        raise ValueError(f"solver: {solver!r} is not an installed cvxpy solver; installed: "
                         f"{installed} (or 'hedge')")
    if name == "HIGHS":
        _silence_highs_banner()
    return name


class _LP(NamedTuple):
    problem: object
    matrix: object  # cp.Parameter (K, K): the group-weighted regret matrix, scaled
    weights: object  # cp.Variable (K,)


def _build_lp(K: int) -> _LP:
    """min t  s.t.  M w <= t,  w >= 0,  sum w = 1, with M = diag(c) R a Parameter (DPP: the
    problem is canonicalized once and re-solved for new values of M). Group weights enter M,
    so one problem serves every c of the same K."""
    cp = _import_cvxpy()
    M = cp.Parameter((K, K), name="weighted_regret")
    w = cp.Variable(K, nonneg=True, name="weights")
    t = cp.Variable(name="max_regret")
    problem = cp.Problem(cp.Minimize(t), [M @ w <= t, cp.sum(w) == 1])
    return _LP(problem, M, w)


_lp_cache_lock = threading.Lock()  # cvxpy problems are not thread-safe: set + solve together


@functools.lru_cache(maxsize=32)
def _cached_lp(K: int) -> _LP:
    return _build_lp(K)


def _solve(cp, problem, solver, what: str):
    try:
        with warnings.catch_warnings():
            # cvxpy warns "Solution may be inaccurate"; that is reported through the status.
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=solver, verbose=False)
    except cp.error.SolverError as e:
        raise RuntimeError(f"{what}: the solver {solver or 'chosen by cvxpy'} failed: {e}") from e
    status = problem.status
    if status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"{what}: the solver {solver or 'chosen by cvxpy'} returned status "
                           f"{status!r}; expected 'optimal'")
    if status == "optimal_inaccurate":
        hint = " solver='HIGHS' (the default when installed) solves the LP exactly." if (
            what == "mmra") else ""
        warnings.warn(f"{what}: the solver {solver or 'chosen by cvxpy'} reports an inaccurate "
                      f"solution (status 'optimal_inaccurate'); the returned max_regret is "
                      f"recomputed from the weights.{hint}", RuntimeWarning, stacklevel=3)
    return status


def _solve_lp(lp: _LP, M: np.ndarray, solver) -> tuple:
    """Solve the LP for M = diag(c) R; returns (weights, status)."""
    cp = _import_cvxpy()
    K = M.shape[0]
    # Scale to max |entry| = 1 so that the solver's absolute tolerances act relatively.
    scale = float(np.max(np.abs(M)))
    lp.matrix.value = M / scale if scale > 0 else M
    status = _solve(cp, lp.problem, solver, "mmra")
    return _clean_simplex(lp.weights.value, K), status


def mmra(regret, *, group_weights=None, solver=None, hedge_iterations=HEDGE_ITERATIONS):
    """MinMax Regret Aggregation: mixture weights minimizing the worst type's regret.

    Solves the linear program

        min_{w in simplex}  max_k  c_k (R w)_k

    (R[k, j] = regret of type k served by policy j, e.g. from :func:`regret_matrix`; c =
    group weights). With cvxpy the LP is built once per K with Parameters (DPP) and re-solved
    for every new matrix, silently, by HiGHS when installed (an exact simplex solution) or
    the solver named. ``solver="hedge"`` instead runs optimistic multiplicative weights on the
    zero-sum game min_w max_p p^T diag(c) R w (the method of the authors' code), with step
    1 / (2 max|c R|): its duality gap after T steps is at most 4 max|c R| ln(K) / T
    (Syrgkanis et al. 2015, RVU property of optimistic Hedge), and the certified gap of the
    averaged strategies is reported in ``status``.

    Args:
        regret: (K, K) finite real matrix, rows = types, columns = policies.
        group_weights: (K,) positive finite per-type weights c; default all 1.
        solver: None (HiGHS, else cvxpy's default), a cvxpy solver name, or "hedge".
        hedge_iterations: T for solver="hedge" (default 100,000, as in the authors' code).

    Returns:
        MMRAResult(weights (K,), max_regret = max_k c_k (R w)_k, regrets = R @ w, status).

    Example:
        >>> import numpy as np, emdpo_core as ec
        >>> R = np.array([[0.0, 2.0], [1.0, 0.0]])  # type 0 loses 2 under policy 1, ...
        >>> r = ec.mmra(R)
        >>> r.weights.round(4).tolist(), round(r.max_regret, 4)
        ([0.6667, 0.3333], 0.6667)
    """
    R = _checks.check_regret(regret)
    K = R.shape[0]
    c = _checks.check_group_weights(group_weights, K)
    with np.errstate(over="ignore"):
        M = c[:, None] * R
    if not np.all(np.isfinite(M)):
        raise ValueError("group_weights: group_weights[k] * regret[k, j] overflows float64; "
                         "rescale the group weights or the regrets")
    if isinstance(solver, str) and solver.lower() == "hedge":
        T = _checks.check_int("hedge_iterations", hedge_iterations, 1)
        w, p = _hedge(M, T)
        regrets = R @ w
        max_regret = float(np.max(c * regrets))
        # the gap in units of max |M| first: both terms may be near the largest float
        scale = float(np.max(np.abs(M))) or 1.0
        gap = scale * max(0.0, float(np.max((M / scale) @ w)) - float(np.min(p @ (M / scale))))
        return MMRAResult(w, max_regret, regrets, f"approximate (hedge, {T} iterations, "
                                                  f"duality gap <= {gap:.3g})")
    cp = _import_cvxpy()
    name = _lp_solver(cp, solver)
    with _lp_cache_lock:
        w, status = _solve_lp(_cached_lp(K), M, name)
    regrets = R @ w
    return MMRAResult(w, float(np.max(c * regrets)), regrets, status)


# ----------------------------------------------------------------------------------------
# Optimistic multiplicative weights (the authors' method), as a cross-check and baseline


@numba.njit(cache=True, nogil=True)
def _softmax_into(scores, out):
    mx = scores[0]
    for i in range(1, scores.shape[0]):
        if scores[i] > mx:
            mx = scores[i]
    total = 0.0
    for i in range(scores.shape[0]):
        out[i] = math.exp(scores[i] - mx)
        total += out[i]
    for i in range(scores.shape[0]):
        out[i] /= total


@numba.njit(cache=True, nogil=True)
def _optimistic_hedge(M, iterations, step):
    """Optimistic Hedge for both players of min_w max_p p^T M w (M: types x policies).

    Round t: the policy player plays w_t, the type player p_t; each sees its payoff vector
    (losses M^T p_t, gains M w_t) and plays next softmax(-+step * (cumulative + last)), i.e.
    Hedge that also counts the last payoff once more as a forecast of the next one.
    Returns the time averages (w_bar, p_bar)."""
    n_types, n_policies = M.shape
    w = np.full(n_policies, 1.0 / n_policies)
    p = np.full(n_types, 1.0 / n_types)
    cum_loss = np.zeros(n_policies)
    cum_gain = np.zeros(n_types)
    loss = np.zeros(n_policies)
    gain = np.zeros(n_types)
    sum_w = np.zeros(n_policies)
    sum_p = np.zeros(n_types)
    score_w = np.zeros(n_policies)
    score_p = np.zeros(n_types)
    for _ in range(iterations):
        loss[:] = 0.0
        for k in range(n_types):
            g = 0.0
            for j in range(n_policies):
                g += M[k, j] * w[j]
                loss[j] += p[k] * M[k, j]
            gain[k] = g
        for j in range(n_policies):
            sum_w[j] += w[j]
            cum_loss[j] += loss[j]
            score_w[j] = -step * (cum_loss[j] + loss[j])
        for k in range(n_types):
            sum_p[k] += p[k]
            cum_gain[k] += gain[k]
            score_p[k] = step * (cum_gain[k] + gain[k])
        _softmax_into(score_w, w)
        _softmax_into(score_p, p)
    return sum_w / iterations, sum_p / iterations


def _hedge(M: np.ndarray, iterations: int):
    # The game is run on M / max|M| (entries in [-1, 1], step 1/2 = 1 / (2 L): the RVU
    # condition, see mmra): the same iterates as M with step 0.5 / max|M|, but cumulative
    # payoffs cannot overflow however large the regrets (up to the largest float).
    scale = float(np.max(np.abs(M)))
    unit = M / scale if scale > 0 else M
    w, p = _optimistic_hedge(np.ascontiguousarray(unit, dtype=np.float64), iterations, 0.5)
    return w / w.sum(), p / p.sum()


# ----------------------------------------------------------------------------------------
# Exact tabular MMRA (exponential cone)


def _xlogy(x, y):
    """x * log(y) with 0 * log(anything) = 0."""
    out = np.zeros(np.broadcast(x, y).shape)
    np.multiply(x, np.log(y, out=np.full_like(out, -np.inf), where=y > 0), out=out, where=x > 0)
    return out


def exact_mixture_regret(weights, policy_probs, *, beta, context_weights=None) -> np.ndarray:
    """(K,) exact regret of each type under the mixture q = sum_j w_j pi_j:
    beta * sum_c rho_c KL(q(.|c) || pi_k(.|c)) (inf where q puts mass outside pi_k's support).
    """
    beta = _checks.check_beta(beta)
    P = _checks.check_policy_probs(policy_probs)
    rho = _checks.check_context_weights(context_weights, P.shape[1])
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (P.shape[0],):
        raise ValueError(f"weights: expected shape ({P.shape[0]},), got {w.shape}")
    q = np.einsum("j,jca->ca", w, P)
    neg_entropy = float(np.sum(rho[:, None] * _xlogy(q, q)))
    cross = np.sum(rho[None, :, None] * _xlogy(q[None], P), axis=(1, 2))  # sum q log pi_k
    return beta * (neg_entropy - cross)


def mmra_exact(policy_probs, *, beta, context_weights=None, group_weights=None, solver=None):
    """Exact MMRA for finite response sets: the mixture minimizing the exact worst regret,

        min_{w in simplex} max_k c_k beta sum_c rho_c KL( sum_j w_j pi_j(.|c) || pi_k(.|c) ).

    Each type's regret is convex in w: with q = sum_j w_j pi_j it is
    beta (-H_rho(q) + sum_j w_j X[k, j]), H_rho the rho-weighted entropy (concave) and
    X[k, j] = -sum_c rho_c sum_a pi_j(a|c) log pi_k(a|c) a cross-entropy (linear in w), so the
    problem is one exponential-cone program with C*A entropy terms (solved by cvxpy, CLARABEL
    by default). The linear :func:`mmra` with kind="kl" regrets bounds this from above
    (KL is convex in its first argument); this solves the regret of the mixture itself.
    A policy whose support is not inside some type's support would give that type infinite
    regret, so it gets weight 0.

    The returned ``regrets`` and ``max_regret`` are recomputed exactly in NumPy from the
    returned weights (not taken from the solver's objective).

    Args:
        policy_probs: (K, C, A) probabilities pi_k(a | c) of K policies over A responses in C
            contexts (rows sum to 1); (K, A) for one context.
        beta: > 0.
        context_weights: (C,) non-negative context weights rho, normalized to sum 1; default
            uniform.
        group_weights: (K,) positive per-type weights c; default 1.
        solver: a cvxpy solver supporting the exponential cone; default CLARABEL when
            installed, else cvxpy's choice.

    Returns:
        MMRAResult(weights, max_regret = max_k c_k regrets_k, regrets (K,), status).

    Example:
        >>> import numpy as np, emdpo_core as ec
        >>> P = np.array([[0.9, 0.1], [0.1, 0.9]])  # two policies, one context, two responses
        >>> r = ec.mmra_exact(P, beta=1.0)
        >>> r.weights.round(3).tolist()
        [0.5, 0.5]
    """
    beta = _checks.check_beta(beta)
    P = _checks.check_policy_probs(policy_probs)
    K, C, A = P.shape
    rho = _checks.check_context_weights(context_weights, C)
    c = _checks.check_group_weights(group_weights, K)
    live = rho > 0
    Pl, rhol = P[:, live], rho[live]
    # X[k, j] = -sum_c rho_c sum_a pi_j(a|c) log pi_k(a|c); inf when pi_j leaves pi_k's support.
    X = np.empty((K, K))
    for k in range(K):
        X[k] = -np.sum(rhol[None, :, None] * _xlogy(Pl, Pl[k][None]), axis=(1, 2))
    allowed = np.all(np.isfinite(X), axis=0)
    if not allowed.any():
        raise ValueError("policy_probs: every policy puts probability on a response that some "
                         "type's policy gives probability 0, so every mixture has infinite "
                         "regret for some type")
    cp = _import_cvxpy()
    if solver is None:
        solver = "CLARABEL" if "CLARABEL" in _installed_solvers() else None
    else:
        solver = _lp_solver(cp, solver)
    idx = np.flatnonzero(allowed)
    # Centre on m = the uniform mixture of the allowed policies:
    #     KL(q || pi_k) = KL(q || m) + sum_a q_a log(m_a / pi_k,a),
    # a shared convex term plus a term linear in w, both of the size of the regrets. (Writing
    # it as -entropy(q) + cross-entropy instead subtracts two numbers of size log A, and the
    # interior-point solver then stops short of its tolerances on larger instances.)
    m = Pl[idx].mean(axis=0)  # (C, A); positive wherever an allowed policy is
    Y = np.empty((K, idx.size))
    for k in range(K):
        Y[k] = np.sum(rhol[None, :, None] * (_xlogy(Pl[idx], m[None]) -
                                             _xlogy(Pl[idx], Pl[k][None])), axis=(1, 2))
    # Only responses some allowed policy can produce carry divergence terms (q = 0 elsewhere).
    Pa = Pl[idx].reshape(idx.size, -1)
    support = np.flatnonzero(Pa.max(axis=0) > 0)
    Pa = Pa[:, support]
    rho_flat = np.repeat(rhol, A)[support]
    m_flat = m.reshape(-1)[support]
    u = cp.Variable(idx.size, nonneg=True)
    t = cp.Variable()
    # h is an epigraph variable for the shared divergence, so its exponential cones are built
    # once rather than once per type; every c_k > 0, so h is tight at the optimum.
    h = cp.Variable()
    q = Pa.T @ u
    cons = [cp.sum(u) == 1, cp.sum(cp.multiply(rho_flat, cp.rel_entr(q, m_flat))) <= h]
    cons += [c[k] * (h + Y[k] @ u) <= t for k in range(K)]
    problem = cp.Problem(cp.Minimize(t), cons)
    status = _solve(cp, problem, solver, "mmra_exact")
    w = np.zeros(K)
    w[idx] = _clean_simplex(u.value, idx.size)
    regrets = exact_mixture_regret(w, P, beta=beta, context_weights=rho)
    return MMRAResult(w, float(np.max(c * regrets)), regrets, status)


# ----------------------------------------------------------------------------------------
# Serving the mixture


class MixturePolicy:
    """A sequence-level mixture of policies: each request draws one component j with
    probability w_j and is answered entirely by it (the mixture the MMRA LP optimizes).

    Args:
        weights: (K,) probabilities (non-negative, sum to 1 within 1e-6), or an MMRAResult.
        policies: K callables (e.g. generate functions); any call signature.
        random_state: None, an int seed or a numpy Generator.

    Attributes:
        weights: (K,) float64 normalized weights.
        last_component: index of the component that answered the latest call (None before).

    Example:
        >>> import emdpo_core as ec
        >>> mix = ec.MixturePolicy([0.25, 0.75], [lambda x: "A:" + x, lambda x: "B:" + x],
        ...                        random_state=0)
        >>> answer = mix("hello")
        >>> answer == ("A:" if mix.last_component == 0 else "B:") + "hello"
        True
    """

    def __init__(self, weights, policies, *, random_state=None):
        if isinstance(weights, MMRAResult):
            weights = weights.weights
        policies = list(policies)
        if not policies:
            raise ValueError("policies: expected at least one callable, got none")
        for j, f in enumerate(policies):
            if not callable(f):
                raise TypeError(f"policies: entry {j} is a {type(f).__name__}, not callable")
        w = _checks.real_vector(weights, "weights", len(policies), "policy")
        bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
        if bad.size:
            raise ValueError(f"weights: expected finite values >= 0, got {w[bad[0]]} at index "
                             f"{bad[0]}")
        if abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"weights: expected probabilities summing to 1, got a sum of "
                             f"{w.sum()!r}")
        self.weights = w / w.sum()
        self.policies = policies
        self._cdf = np.cumsum(self.weights)
        self._cdf[-1] = 1.0
        self._rng = np.random.default_rng(random_state)
        self.last_component = None

    def sample_components(self, n: int) -> np.ndarray:
        """(n,) int64 component indices drawn i.i.d. from the weights."""
        idx = np.searchsorted(self._cdf, self._rng.random(int(n)), side="right")
        return np.minimum(idx, len(self.policies) - 1).astype(np.int64)

    def sample_component(self) -> int:
        """One component index drawn from the weights."""
        return int(self.sample_components(1)[0])

    def __call__(self, *args, **kwargs):
        j = self.sample_component()
        self.last_component = j
        return self.policies[j](*args, **kwargs)

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return f"MixturePolicy(weights={np.round(self.weights, 4).tolist()}, K={len(self)})"

