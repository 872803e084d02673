"""The EM engine over latent annotator types, and its exact tabular form.

EM-DPO (DESIGN.md section 1): annotators h = 0..H-1 belong to K latent types with weights eta;
type k ranks a record's candidates by Plackett-Luce on the rewards
r_kj = beta (log pi_k(y_j) - log pi_ref(y_j)). EM alternates
    E-step  g_hk = posterior of annotator h over types, from all of h's records
            (the fused compiled kernel :func:`emdpo_core.e_step`);
    M-step  eta_k = (sum_h v_h g_hk + alpha - 1) / (sum_h v_h + K (alpha - 1)), and each
            policy pi_k maximizes sum_i w_ik ll_ik with w_ik = c_i v_{a_i} g_{a_i k}
            (a weighted listwise DPO problem, solved by the policy family).
The objective
    F = sum_h v_h log sum_k eta_k p(records of h | type k)       (observed-data log-lik)
        + (alpha - 1) sum_k log eta_k + family.log_prior()       (log priors, up to a constant)
never decreases when the family's M-step does not decrease its weighted objective (a
generalized EM); the engine records F / (number of records) after every E-step in
``lower_bounds_``.

The engine (:class:`EMEstimator`) owns the E-step, the mixture weights, convergence,
restarts, warm starts, collapsed components, checkpoints and progress output. A policy family
(:class:`PolicyFamily`) owns the K policies: their log-probabilities and their M-step.
:class:`TabularPolicies` is the exact tabular family (a Plackett-Luce worth vector per type,
Hunter's MM M-step); :class:`PlackettLuceMixture` is the engine with that family.
"""

from __future__ import annotations

import abc
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np

from . import _plackett_luce_mm as bk
from .. import diagnostics
from ..data import GroupedRankings, RankingData
from ..diagnostics import IdentifiabilityWarning
from ..ops.listwise import e_step

__all__ = [
    "ConvergenceWarning",
    "CollapsedComponentWarning",
    "PolicyLogps",
    "PolicySamples",
    "PolicyFamily",
    "TabularPolicies",
    "EMEstimator",
    "PlackettLuceMixture",
    "ModelSelection",
    "select_n_components",
]

INIT_PARAMS = ("kmeans", "random", "dirichlet")
# Hard initial assignments (k-means, random) are smoothed: g = (1 - s) onehot + s / K, so no
# type starts with zero weight and every record informs every type's first M-step a little.
INIT_SMOOTHING = 0.05
# Worths below exp(-LOG_WORTH_RANGE) times the largest are indistinguishable from 0 in float64
# sums; log-worths are kept within this range of the row maximum (only reachable without a
# pseudo-count, for items a type never chooses).
LOG_WORTH_RANGE = 700.0
# Newton steps in the tabular M-step (newton="auto") for at most this many items: the step
# solves an n_items x n_items eigenproblem per type, O(n_items^3).
NEWTON_MAX_ITEMS = 256
# Eigenvalues of the negated Hessian below NEWTON_RCOND times the largest are treated as 0
# (a pseudo-inverse): the scale direction (pseudo_count = 0), items no record of the type
# has in play, and directions whose curvature is lost to rounding.
NEWTON_RCOND = 1e-12
# Step halvings before a type's Newton step is given up for this M-step (1/2^30 of the
# step is far below any change that float64 log-likelihoods can register).
NEWTON_HALVINGS = 30
# A Newton step (or a halved one) whose predicted gain of Q_k is below this times |Q_k| is
# not tried: a few float64 ulps of Q_k, a gain that comparing computed values cannot confirm
# (at convergence every step would otherwise be halved NEWTON_HALVINGS times in vain).
NEWTON_MIN_GAIN = 1e-15
_FORMAT_VERSION = 1


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the objective settled within ``tol``."""


class CollapsedComponentWarning(UserWarning):
    """A type's weight fell below ``min_weight``; it was dropped."""


class PolicyLogps(NamedTuple):
    """What a policy family hands to the E-step.

    policy: (K, M) log-probabilities of every slot under each type's policy (NumPy, or torch
        tensors: the kernel dispatches on the type).
    ref: (M,) reference log-probabilities.
    beta: DPO temperature.
    """

    policy: Any
    ref: Any
    beta: float


class PolicyFamily(abc.ABC):
    """K policies that the EM engine fits. Subclass this to plug a model into the engine.

    The engine calls, in this order:
      ``check_data(data)`` once per fit (raise ValueError for data the family cannot use);
      ``annotator_features(data)`` only for ``init_params="kmeans"``;
      ``initialize(data, weights, rng)`` at the start of every restart;
      then per iteration ``keep_components(keep)`` when types collapse, ``m_step(data,
      weights)``, ``logps(data)``; ``log_prior()`` after every E-step;
      ``state_dict()`` / ``load_state_dict(state)`` for restarts (keep the best),
      checkpoints and save/load.

    ``data`` is the grouped data: what the user's data object's ``grouped()`` returns, a
    :class:`~emdpo_core.data.GroupedRecords` subclass (records sorted by annotator; e.g.
    :class:`~emdpo_core.data.GroupedRankings` for tabular rankings). Every per-record or
    per-slot array the family makes must follow that order. ``weights`` is a (K, N) float64 array,
    w[k, i] = c_i v_{a_i} g_{a_i k}: record i's weight for type k (its count times its
    annotator's count times the annotator's posterior).
    """

    @property
    @abc.abstractmethod
    def n_components(self) -> int:
        """K, the number of policies held now."""

    def check_data(self, data, *, fitting: bool) -> None:
        """Raise ValueError when the family cannot use ``data``: to fit it (fitting=True) or
        to compute log-probabilities on it with the fitted policies (fitting=False)."""

    def annotator_features(self, data) -> np.ndarray:
        """(H, D) float64 features of each annotator's records for the k-means start."""
        raise NotImplementedError(
            f"{type(self).__name__} has no annotator features; use init_params='random', "
            f"'dirichlet' or given responsibilities instead of 'kmeans'")

    @abc.abstractmethod
    def initialize(self, data, weights: np.ndarray, rng: np.random.Generator) -> None:
        """Set up K = weights.shape[0] policies fitted to the initial (K, N) weights."""

    @abc.abstractmethod
    def logps(self, data) -> PolicyLogps:
        """Policy (K, M) and reference (M,) log-probabilities of every slot, and beta."""

    @abc.abstractmethod
    def m_step(self, data, weights: np.ndarray) -> None:
        """Improve the policies on the weighted listwise objective sum_i w_ki ll_ki (+ the
        family's log prior). For a monotone EM it must not decrease that objective."""

    def log_prior(self) -> float:
        """Log prior density of the current policies (up to a constant); default 0."""
        return 0.0

    @abc.abstractmethod
    def n_parameters(self) -> int:
        """Free parameters of the K policies (for BIC/AIC)."""

    @abc.abstractmethod
    def keep_components(self, keep: np.ndarray) -> None:
        """Keep only the policies at the (sorted) indices ``keep``, in that order."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, np.ndarray]:
        """A copy of the policies' state: names to NumPy arrays (no pickled objects)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        """Restore a state returned by :meth:`state_dict`."""

    def policy_samples(self, contexts, n_samples: int, rng: np.random.Generator) -> "PolicySamples":
        """Responses drawn from each of the K policies for ``contexts``, with every policy's
        and the reference's log-probabilities of them (for MMRA's regret matrix; see
        ``EMDPO.aggregate``). Optional: families that cannot sample raise
        NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample responses, so it cannot "
                                  f"be aggregated")


class PolicySamples(NamedTuple):
    """Samples of K policies with cached log-probabilities (the input of
    :func:`emdpo_core.regret_matrix`).

    logps: (K, S) log pi_k(y_s | x_s) under every policy k.
    ref: (S,) log pi_ref(y_s | x_s), or None when the family has no reference for them.
    source_offsets: (K+1,) samples of policy j are source_offsets[j]:source_offsets[j+1].
    weights: (S,) sample weights (e.g. exact probabilities when responses are enumerated),
        or None for plain means.
    beta: the DPO temperature of the policies.
    """

    logps: Any
    ref: Any
    source_offsets: np.ndarray
    weights: Any
    beta: float


class TabularPolicies(PolicyFamily):
    """Tabular policies over a finite item set: one Plackett-Luce worth vector per type.

    With a uniform reference policy and beta = 1 a tabular policy's reward for item j is its
    log-probability log pi_k(j) = theta_kj - log Z_k, and a per-type constant cancels in every
    Plackett-Luce term, so type k's policy log-probability of slot j can be taken as
    ``theta[k, items[j]]``: EM-DPO with tabular policies *is* EM for a mixture of
    Plackett-Luce models (Gormley and Murphy 2008).

    M-step: ``mm_iter`` steps of Hunter's (2004) minorization-maximization algorithm for the
    weighted Plackett-Luce likelihood, each monotone (see
    ``emdpo_core._bookkeeping.pl_mm_step``), so the EM is a generalized EM whose objective
    never decreases, whatever ``mm_iter``.

    Newton steps (``newton``; "auto" = for at most NEWTON_MAX_ITEMS items). Each MM step is
    followed by a Newton step on the type's M-step objective
    Q_k(theta) = sum_r w_kr ll_r(theta) + log prior (concave in theta): direction
    d = (-H)^+ g (pseudo-inverse of the negated Hessian, see NEWTON_RCOND), step theta + s d
    with s = 1, 1/2, 1/4, ... until Q_k increases (else the MM point is kept). Only
    increases are accepted, so the EM stays monotone. Why: when the maximum-likelihood worths
    of a set of items go to 0 together (a type that never ranks them above the others, common
    for K >= 2 on small item sets, e.g. election ballots; the likelihood's supremum is then
    reached only in the limit), an MM step shrinks such worths by a factor 1 - O(worth), so
    the log-likelihood gap decays only like 1 / (number of MM steps): 3e-3 after 20,000
    iterations on the 15 most frequent Debian 2002 ballot types with K = 2. The Newton step
    moves their log-worths by O(1) per step (Q is about const - a e^theta there, so
    -g/H = -1), and the gap decays geometrically: 4e-11 after 116 iterations on the same
    data (tests/data/README.md). Cost per MM step: one O(m^2) pass per record (value,
    gradient, Hessian), one n_items x n_items eigenproblem per type, and one weighted
    log-likelihood pass per tried step length (usually one; none when the predicted gain is
    below rounding, see NEWTON_MIN_GAIN).

    Pseudo-count. With ``pseudo_count = c > 0`` every item of every type gets c virtual wins
    and c virtual losses against a dummy item of fixed worth 1 (theta = 0). This adds the
    log prior  c * sum_i (theta_i - 2 log(1 + exp theta_i))  (maximal at theta_i = 0), keeps
    the worths of items a type never chooses finite (the maximum-likelihood worth of an item
    never chosen is 0, log-worth -inf) and fixes the scale. With c = 0 the M-step is the
    plain maximum-likelihood MM; every item must then be chosen at least once in the data.

    Args:
        pseudo_count: c >= 0 above.
        mm_iter: MM steps per M-step (>= 1).
        init_mm_iter: MM steps at most when fitting the initial weights.
        newton: True, False or "auto" (True when n_items <= NEWTON_MAX_ITEMS): follow every
            MM step by a safeguarded Newton step (above).
    """

    def __init__(self, pseudo_count: float = 0.01, mm_iter: int = 1, init_mm_iter: int = 100,
                 newton="auto"):
        self.pseudo_count = float(pseudo_count)
        self.mm_iter = int(mm_iter)
        self.init_mm_iter = int(init_mm_iter)
        if not (isinstance(newton, (bool, np.bool_)) or
                (isinstance(newton, str) and newton == "auto")):
            raise ValueError(f"newton: expected True, False or 'auto', got {newton!r}")
        self.newton = newton
        self.log_worths: Optional[np.ndarray] = None  # (K, n_items), internal scale

    @property
    def n_components(self) -> int:
        return 0 if self.log_worths is None else int(self.log_worths.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.log_worths.shape[1])

    def check_data(self, data, *, fitting: bool) -> None:
        if not isinstance(data, GroupedRankings):
            raise TypeError(f"data: tabular policies fit RankingData, got "
                            f"{type(data).__name__}")
        if self.log_worths is not None and data.n_items > self.n_items:
            raise ValueError(f"data: has n_items={data.n_items} but the model was fitted on "
                             f"{self.n_items} items")
        if fitting and self.pseudo_count == 0.0:
            chosen = np.zeros(data.n_items, dtype=bool)
            first = np.repeat(data.offsets[:-1], data.n_ranked) + \
                _ranges(data.n_ranked)
            chosen[data.items[first]] = True
            never = np.flatnonzero(~chosen)
            if never.size:
                raise ValueError(
                    f"pseudo_count=0 (maximum likelihood) needs every item to be chosen at "
                    f"least once, but item {never[0]} ({never.size} item(s) in all) is never "
                    f"ranked above another: its maximum-likelihood worth is 0; use "
                    f"pseudo_count > 0")

    def annotator_features(self, data, max_features: int = 256) -> np.ndarray:
        """Mean normalized position of each item per annotator (see
        ``_bookkeeping.position_features``), over the ``max_features`` most shown items."""
        shown = np.bincount(data.items, minlength=data.n_items)
        cols = np.argsort(-shown, kind="stable")[:max_features]
        cols = cols[shown[cols] > 0]
        column_of = np.full(data.n_items, -1, dtype=np.int64)
        column_of[cols] = np.arange(cols.shape[0])
        return bk.position_features(data.items, data.offsets, data.n_ranked,
                                    data.annotator_offsets, data.record_weight, column_of,
                                    cols.shape[0])

    def _anchor(self, theta):
        if self.pseudo_count == 0.0:
            # Scale-free: anchor the largest log-worth at 0 and keep the rest within range.
            theta -= theta.max(axis=1, keepdims=True)
            np.maximum(theta, -LOG_WORTH_RANGE, out=theta)
        return theta

    def _mm(self, data, weights, wins):
        new = bk.pl_mm_step(data.items, data.offsets, data.n_ranked, weights, wins,
                            self.log_worths, self.pseudo_count, data.m_max)
        return self._anchor(new)

    def _uses_newton(self) -> bool:
        if isinstance(self.newton, str):
            return self.n_items <= NEWTON_MAX_ITEMS
        return bool(self.newton)

    def _log_prior_rows(self, theta):
        """(K,) the pseudo-count log prior of each type."""
        c = self.pseudo_count
        if c == 0.0:
            return np.zeros(theta.shape[0])
        return c * np.sum(theta - 2.0 * np.logaddexp(0.0, theta), axis=1)

    def _m_objective(self, data, weights, theta):
        """(K,) Q_k(theta_k) = sum_r w_kr ll_r(theta_k) + the pseudo-count log prior."""
        return bk.pl_scaled_loglik(data.items, data.offsets, data.n_ranked, weights, theta,
                                   data.m_max) + self._log_prior_rows(theta)

    def _newton(self, data, weights, theta):
        """theta after one safeguarded Newton step on Q_k per type (see the class
        docstring); a type whose step does not increase Q_k keeps its theta."""
        q0, grad, hess = bk.pl_grad_hess(data.items, data.offsets, data.n_ranked, weights,
                                         theta, data.m_max)
        q0 = q0 + self._log_prior_rows(theta)
        c = self.pseudo_count
        if c != 0.0:
            sig = 0.5 * (1.0 + np.tanh(0.5 * theta))    # logistic(theta), no overflow
            grad += c * (1.0 - 2.0 * sig)
            diag = np.einsum("kii->ki", hess)
            diag -= 2.0 * c * sig * (1.0 - sig)
        lam, vec = np.linalg.eigh(-hess)                 # -H is positive semi-definite
        cutoff = NEWTON_RCOND * np.maximum(lam[:, -1:], np.finfo(np.float64).tiny)
        inv = np.where(lam > cutoff, 1.0 / np.where(lam > cutoff, lam, 1.0), 0.0)
        step = np.einsum("kij,kj->ki", vec, inv * np.einsum("kji,kj->ki", vec, grad))
        # On the quadratic model, the step s * step gains (s - s^2 / 2) * grad.step.
        slope = np.einsum("ki,ki->k", grad, step)
        least = NEWTON_MIN_GAIN * np.abs(q0)
        out = theta.copy()
        todo = np.flatnonzero(np.all(np.isfinite(step), axis=1) & np.isfinite(q0))
        s = 1.0
        for _ in range(NEWTON_HALVINGS):
            todo = todo[(s - 0.5 * s * s) * slope[todo] > least[todo]]
            if todo.size == 0:
                break
            trial = self._anchor(theta[todo] + s * step[todo])
            q = self._m_objective(data, np.ascontiguousarray(weights[todo]), trial)
            better = q > q0[todo]
            out[todo[better]] = trial[better]
            todo = todo[~better]
            s *= 0.5
        return out

    def initialize(self, data, weights, rng) -> None:
        self.log_worths = np.zeros((weights.shape[0], data.n_items))
        wins = bk.pl_wins(data.items, data.offsets, data.n_ranked, weights, data.n_items)
        for _ in range(self.init_mm_iter):
            new = self._mm(data, weights, wins)
            done = np.max(np.abs(new - self.log_worths)) < 1e-6
            self.log_worths = new
            if done:
                break

    def logps(self, data) -> PolicyLogps:
        policy = np.take(self.log_worths, data.items, axis=1)
        return PolicyLogps(policy, np.zeros(data.items.shape[0]), 1.0)

    def m_step(self, data, weights) -> None:
        wins = bk.pl_wins(data.items, data.offsets, data.n_ranked, weights, data.n_items)
        newton = self._uses_newton()
        for _ in range(self.mm_iter):
            new = self._mm(data, weights, wins)
            if newton:
                new = self._newton(data, weights, new)
            self.log_worths = new

    def log_prior(self) -> float:
        c = self.pseudo_count
        if c == 0.0:
            return 0.0
        t = self.log_worths
        return float(c * np.sum(t - 2.0 * np.logaddexp(0.0, t)))

    def n_parameters(self) -> int:
        return self.n_components * (self.n_items - 1)

    def keep_components(self, keep) -> None:
        self.log_worths = np.ascontiguousarray(self.log_worths[keep])

    def state_dict(self):
        return {"log_worths": self.log_worths.copy()}

    def load_state_dict(self, state) -> None:
        if "log_worths" not in state:
            raise ValueError(f"state: no 'log_worths' entry, so not the state of TabularPolicies "
                             f"(entries: {sorted(state)[:4]}); was the model fitted with another "
                             f"policy family? Load it with that family, e.g. "
                             f"EMDPO.load(path, policies=...)")
        self.log_worths = np.ascontiguousarray(np.asarray(state["log_worths"], dtype=np.float64))

    def policy_samples(self, contexts, n_samples, rng) -> PolicySamples:
        """Exact enumeration instead of sampling: every item of every context is a "sample"
        of policy j with weight pi_j(item | context) / C, so the regret matrix built from
        them is exact. ``contexts``: None (one context, all items) or a list of C candidate
        sets (sequences of item ids). The policy of type k over a candidate set c is
        softmax over c of its log-worths; the reference is uniform over c; beta = 1.
        ``n_samples`` and ``rng`` are not used."""
        n = self.n_items
        if contexts is None:
            contexts = [np.arange(n)]
        sets = []
        for c, items in enumerate(contexts):
            a = np.asarray(items)
            if a.ndim != 1 or a.shape[0] < 2 or a.dtype.kind not in "iu" or \
                    np.unique(a).shape[0] != a.shape[0] or a.min() < 0 or a.max() >= n:
                raise ValueError(f"contexts: entry {c} must be at least 2 distinct item ids in "
                                 f"[0, {n}), got {np.asarray(items).tolist()}")
            sets.append(a.astype(np.int64))
        items = np.concatenate(sets)
        ctx = np.repeat(np.arange(len(sets)), [len(a) for a in sets])
        starts = np.concatenate([[0], np.cumsum([len(a) for a in sets])[:-1]])
        t = self.log_worths[:, items]                                       # (K, S0)
        lse = np.logaddexp.reduceat(t, starts, axis=1)                      # (K, C)
        logp = t - lse[:, ctx]                                              # log pi_k(a | c)
        K = self.n_components
        S0 = items.shape[0]
        ref = -np.log(np.array([len(a) for a in sets], dtype=np.float64))[ctx]
        return PolicySamples(logps=np.ascontiguousarray(np.tile(logp, (1, K))),
                             ref=np.tile(ref, K), source_offsets=np.arange(K + 1) * S0,
                             weights=np.exp(logp).reshape(-1) / len(sets), beta=1.0)


def _ranges(lengths):
    """[0..l0-1, 0..l1-1, ...] for an int array of lengths."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total) - starts


def _to_numpy(x):
    """NumPy view of a kernel result (torch tensors from a torch family come back here)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class _Run:
    """One EM run's state at an iteration boundary (after an E-step)."""

    restart: int
    n_iter: int
    log_weights: np.ndarray            # (K,)
    resp: np.ndarray                   # (H, K)
    loglik: float
    objective: float
    trace: List[float]                 # objective / total weight after each E-step
    converged: bool = False
    components: Optional[np.ndarray] = None   # original index of each component still held
    dropped: List[List[int]] = field(default_factory=list)   # [iteration, original index]


def _check_int(name, x, minimum):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x}")
    return int(x)


def _check_float(name, x, minimum, *, strict=False):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} "
                         f"{minimum}, got {x}")
    return x


class EMEstimator(abc.ABC):
    """EM over latent annotator types for any :class:`PolicyFamily` (scikit-learn style).

    Subclasses provide ``_make_family()`` and ``_as_data(data)`` (it validates the user's
    data object, whose ``grouped()`` returns a :class:`~emdpo_core.data.GroupedRecords`), and
    optionally ``_data_warnings(data)`` and ``_on_fitted(data)``. See the module docstring
    for the algorithm and the objective.

    Args:
        n_components: K, the number of latent types.
        max_iter: EM iterations (M-step + E-step) per restart.
        tol: convergence when the change of the objective per record, F / sum_i c_i v_{a_i},
            between two E-steps is below tol.
        n_init: restarts from different initialisations; the run with the highest objective
            is kept.
        init_params: "kmeans" (weighted k-means on the family's annotator features, k-means++
            seeding), "random" (each annotator to a random type), "dirichlet" (responsibilities
            drawn from a flat Dirichlet), or an (H, K) array of initial responsibilities.
            Hard assignments are smoothed by INIT_SMOOTHING.
        random_state: int, None or a numpy Generator. Restart r draws from
            SeedSequence([seed, r]), so results do not depend on how restarts are resumed.
        warm_start: if fitted, ``fit`` continues from the fitted policies and weights (one
            run, n_init ignored).
        verbose: 0 silent, 1 progress bar (tqdm, on stderr), 2 also one line per iteration.
        alpha: symmetric Dirichlet prior on the mixture weights, >= 1 (1 = maximum
            likelihood; alpha > 1 keeps every weight away from 0).
        min_weight: a type whose weight falls below this is dropped (its policy removed, its
            annotators' posteriors renormalized over the other types), with a
            CollapsedComponentWarning; recorded in ``dropped_components_``. "auto" (default)
            = half an annotator, 0.5 / sum_h v_h; 0 drops only weights that are exactly 0.
            Dropping rather than re-seeding keeps runs deterministic and never invents a type
            the data do not support; the objective is monotone between drops (a drop can move
            it either way; no convergence test is made in the iteration of a drop).
        checkpoint: path of a checkpoint file (.npz) written every ``checkpoint_every``
            iterations, at the end of each restart and when the fit is interrupted (any
            exception, e.g. KeyboardInterrupt: the state of the last completed iteration).
            ``type(model).load(path).fit(data)`` resumes and gives exactly the result of an
            uninterrupted run.
        checkpoint_every: iterations between checkpoint writes.

    Fitted attributes: ``weights_`` (K,), ``responsibilities_`` (H, K) (row h: annotator h of
    the data, see ``RankingData.annotator_labels``), ``loglik_`` (observed-data
    log-likelihood of the best run, weighted), ``log_prior_``, ``objective_`` (loglik_ +
    log_prior_), ``lower_bound_`` (objective per record), ``lower_bounds_`` (its trace, one
    value per E-step, initial E-step included), ``converged_``, ``n_iter_``,
    ``n_components_`` (K after drops), ``dropped_components_`` ([iteration, original
    index] pairs), ``restarts_`` (one summary dict per restart), ``timings_`` (seconds in
    "init", "logps", "e_step", "m_step", "bookkeeping", "checkpoint"), ``family_``.
    """

    def __init__(self, n_components: int, *, max_iter: int = 500, tol: float = 1e-6,
                 n_init: int = 1, init_params="kmeans", random_state=None,
                 warm_start: bool = False, verbose: int = 0, alpha: float = 1.0,
                 min_weight="auto", checkpoint=None, checkpoint_every: int = 10):
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.init_params = init_params
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.alpha = alpha
        self.min_weight = min_weight
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self._pending: Optional[dict] = None   # an unfinished fit loaded from a checkpoint

    # ------------------------------------------------------------------------------------
    # To provide

    @abc.abstractmethod
    def _make_family(self) -> PolicyFamily:
        """The policy family for a new fit, configured from the estimator's parameters. It
        may return a user-given family object itself: ``initialize`` resets it at the start
        of every restart."""

    @abc.abstractmethod
    def _as_data(self, data):
        """Validate the user's data object; returns it (it must have ``grouped()``)."""

    def _data_warnings(self, data) -> List[str]:
        """Messages emitted as IdentifiabilityWarning at the start of fit."""
        return []

    def _on_fitted(self, data) -> None:
        """Subclass hook: set extra fitted attributes from the data."""

    # ------------------------------------------------------------------------------------
    # Parameters (scikit-learn conventions)

    @classmethod
    def _param_names(cls):
        """Named parameters of __init__ along the class hierarchy (a subclass may pass the
        engine's parameters on with **kwargs)."""
        names = []
        for klass in cls.__mro__:
            if "__init__" not in vars(klass) or not issubclass(klass, EMEstimator):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) \
                        and p.name not in names:
                    names.append(p.name)
        return names

    def get_params(self, deep: bool = False) -> dict:
        return {p: getattr(self, p) for p in self._param_names()}

    def set_params(self, **params):
        names = self._param_names()
        for k, v in params.items():
            if k not in names:
                raise ValueError(f"set_params: unknown parameter {k!r}; valid: {names}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        defaults = {}
        for klass in reversed(type(self).__mro__):
            if "__init__" in vars(klass) and issubclass(klass, EMEstimator):
                for p in inspect.signature(klass.__init__).parameters.values():
                    defaults[p.name] = p.default
        shown = []
        for p in self._param_names():
            v = getattr(self, p)
            if isinstance(v, np.ndarray):
                shown.append(f"{p}=array{v.shape}")
            elif not (v is defaults.get(p) or (isinstance(v, (int, float, str, type(None)))
                                                and v == defaults.get(p))):
                shown.append(f"{p}={v!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def _check_params(self):
        _check_int("n_components", self.n_components, 1)
        _check_int("max_iter", self.max_iter, 1)
        _check_float("tol", self.tol, 0.0)
        _check_int("n_init", self.n_init, 1)
        _check_int("verbose", self.verbose, 0)
        _check_float("alpha", self.alpha, 1.0)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        if not (isinstance(self.min_weight, str) and self.min_weight == "auto"):
            w = _check_float("min_weight", self.min_weight, 0.0)
            if w >= 1.0:
                raise ValueError(f"min_weight: expected 'auto' or a number in [0, 1), got {w}")
        if isinstance(self.init_params, str):
            if self.init_params not in INIT_PARAMS:
                raise ValueError(f"init_params: expected one of {INIT_PARAMS} or an (H, K) "
                                 f"array of responsibilities, got {self.init_params!r}")
        rs = self.random_state
        if not (rs is None or isinstance(rs, np.random.Generator) or
                (isinstance(rs, (int, np.integer)) and not isinstance(rs, bool) and rs >= 0)):
            raise TypeError(f"random_state: expected None, an int >= 0 or a numpy Generator, got "
                            f"{rs!r}")

    def _min_weight(self, g) -> float:
        if isinstance(self.min_weight, str):
            return 0.5 / g.annotator_total
        return float(self.min_weight)

    def _check_fitted(self):
        if getattr(self, "family_", None) is None or not hasattr(self, "weights_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit first")

    # ------------------------------------------------------------------------------------
    # EM steps

    def _e_step(self, g, log_weights):
        """(responsibilities (H, K), weighted loglik, per-annotator log-lik (H,))."""
        t0 = time.perf_counter()
        lp = self.family_.logps(g)
        t1 = time.perf_counter()
        res = e_step(lp.policy, lp.ref, g.offsets, g.annotator_offsets, log_weights,
                     beta=lp.beta, n_ranked=g.n_ranked,
                     record_weights=None if g.unit_record_weight else g.record_weight)
        resp = _to_numpy(res.responsibilities)
        loglik, per = bk.weighted_loglik(_to_numpy(res.annotator_loglik), log_weights,
                                         g.annotator_weight)
        t2 = time.perf_counter()
        self.timings_["logps"] += t1 - t0
        self.timings_["e_step"] += t2 - t1
        return np.ascontiguousarray(resp, dtype=np.float64), float(loglik), per

    def _objective(self, loglik, log_weights):
        prior = 0.0
        if self.alpha != 1.0:
            prior += (self.alpha - 1.0) * float(np.sum(log_weights))
        prior += self.family_.log_prior()
        return loglik + prior

    def _weights_and_drops(self, g, resp, components):
        """Mixture weights from resp; drop types below min_weight. Returns (eta, resp, keep)
        with keep None when nothing is dropped."""
        eta = bk.mixture_weights(resp, g.annotator_weight, float(self.alpha))
        before = eta
        threshold = self._min_weight(g)
        low = (eta < threshold) | (eta <= 0.0)
        if not low.any() or low.all():
            return eta, resp, None
        keep = np.flatnonzero(~low)
        resp = np.ascontiguousarray(resp[:, keep])
        rows = resp.sum(axis=1, keepdims=True)
        empty = rows[:, 0] <= 1e-300
        resp /= np.where(empty[:, None], 1.0, rows)
        if empty.any():
            resp[empty] = eta[keep] / eta[keep].sum()
        eta = bk.mixture_weights(resp, g.annotator_weight, float(self.alpha))
        for k in np.flatnonzero(low):
            warnings.warn(
                f"{type(self).__name__}: type {int(components[k])} collapsed (weight "
                f"{before[k]:.3g} < min_weight={threshold:.3g}) and was dropped; "
                f"{keep.size} types remain. Use fewer n_components, alpha > 1, or "
                f"min_weight=0 to keep it", CollapsedComponentWarning, stacklevel=4)
        return eta, resp, keep

    def _initial_resp(self, g, K, rng):
        H = g.n_annotators
        init = self.init_params
        if not isinstance(init, str):
            r = np.asarray(init, dtype=np.float64)
            if r.shape != (H, K):
                raise ValueError(f"init_params: expected an (H, K) = ({H}, {K}) array of "
                                 f"responsibilities, got shape {r.shape}")
            bad = np.flatnonzero(~np.isfinite(r).all(axis=1) | (r < 0).any(axis=1) |
                                 ~(r.sum(axis=1) > 0))
            if bad.size:
                raise ValueError(f"init_params: row {bad[0]} must be finite, >= 0 and not all 0, "
                                 f"got {r[bad[0]].tolist()}")
            return r / r.sum(axis=1, keepdims=True)
        if init == "dirichlet":
            return rng.dirichlet(np.ones(K), size=H)
        if init == "random":
            labels = rng.integers(0, K, size=H)
        else:
            X = np.ascontiguousarray(self.family_.annotator_features(g), dtype=np.float64)
            if X.ndim != 2 or X.shape[0] != H:
                raise ValueError(f"{type(self.family_).__name__}.annotator_features: expected "
                                 f"shape ({H}, D), got {X.shape}")
            centers = _kmeans_plus_plus(X, g.annotator_weight, K, rng)
            labels, _, _ = bk.kmeans_lloyd(X, g.annotator_weight, centers, 100)
        resp = np.full((H, K), INIT_SMOOTHING / K)
        resp[np.arange(H), labels] += 1.0 - INIT_SMOOTHING
        return resp

    # ------------------------------------------------------------------------------------
    # Fit

    def fit(self, data, *, callback=None):
        """Fit the mixture by EM; returns self.

        Args:
            data: the data (for :class:`PlackettLuceMixture`: a RankingData).
            callback: optional ``callback(info)`` called after every E-step with a dict
                (restart, iteration, objective, lower_bound, change, weights). An exception it
                raises stops the fit (after writing the checkpoint when one is set).
        """
        self._check_params()
        data = self._as_data(data)
        g = data.grouped()
        if self.n_components > g.n_annotators and self._pending is None and not \
                (self.warm_start and getattr(self, "family_", None) is not None):
            raise ValueError(f"n_components={self.n_components} exceeds the number of annotators "
                             f"H={g.n_annotators}")
        for msg in self._data_warnings(data):
            warnings.warn(msg, IdentifiabilityWarning, stacklevel=2)
        self.timings_ = dict.fromkeys(
            ("init", "logps", "e_step", "m_step", "bookkeeping", "checkpoint"), 0.0)
        total_weight = g.total_weight
        pending, self._pending = self._pending, None
        warm = (pending is None and self.warm_start and
                getattr(self, "family_", None) is not None and hasattr(self, "weights_"))
        if pending is not None:
            if pending["fingerprint"] != g.fingerprint():
                raise ValueError("fit: the checkpoint was written for different data (the "
                                 "fingerprints of the grouped records differ)")
            seed, best, run = pending["seed"], pending["best"], pending["run"]
            n_runs, first = pending["n_runs"], pending["next_restart"]
            summaries = list(pending["summaries"])
            if pending["run_family"] is not None:
                self.family_.load_state_dict(pending["run_family"])
        else:
            if not warm:
                self.family_ = self._make_family()
            seed = self._seed()
            best, run, first, summaries = None, None, 0, []
            n_runs = 1 if warm else int(self.n_init)
        self.family_.check_data(g, fitting=True)
        self._fit_seed = seed
        bar = None
        if self.verbose >= 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=(n_runs - first) * self.max_iter, desc=type(self).__name__,
                       unit="it", leave=False)
        self._snapshot = None
        try:
            for r in range(first, n_runs):
                if run is None:
                    t0 = time.perf_counter()
                    run = self._warm_run(g, total_weight) if warm else \
                        self._init_run(g, r, seed, total_weight)
                    self.timings_["init"] += time.perf_counter() - t0
                run = self._iterate(g, run, total_weight, best, summaries, n_runs, callback, bar)
                if best is None or run.objective > best["run"].objective:
                    best = {"run": run, "family": self.family_.state_dict()}
                summaries.append({"restart": r, "objective": run.objective,
                                  "loglik": run.loglik, "n_iter": run.n_iter,
                                  "converged": run.converged,
                                  "n_components": int(run.log_weights.shape[0])})
                run, self._snapshot = None, None
                self._save_checkpoint(g, best, summaries, None, r + 1, n_runs)
        except BaseException:
            if self.checkpoint is not None and self._snapshot is not None:
                snap_run, snap_family = self._snapshot
                self._save_checkpoint(g, best, summaries, snap_run, snap_run.restart, n_runs,
                                      run_family=snap_family)
            raise
        finally:
            self._snapshot = None
            if bar is not None:
                bar.close()
        self._set_fitted(best, summaries, g)
        self._on_fitted(data)
        if not self.converged_:
            warnings.warn(
                f"{type(self).__name__}: the best of {n_runs} run(s) did not converge in "
                f"max_iter={self.max_iter} iterations (last change of the objective per record "
                f"{self._last_change(best['run']):.3g} >= tol={self.tol:g}). Remedies: increase "
                f"max_iter, loosen tol, {self._m_step_remedy} or continue from this fit with "
                f"warm_start=True", ConvergenceWarning, stacklevel=2)
        if self.checkpoint is not None:
            t0 = time.perf_counter()
            self.save(self.checkpoint)
            self.timings_["checkpoint"] += time.perf_counter() - t0
        return self

    _m_step_remedy = "do more work per M-step,"

    @staticmethod
    def _last_change(run):
        return abs(run.trace[-1] - run.trace[-2]) if len(run.trace) > 1 else float("nan")

    def _seed(self) -> int:
        rs = self.random_state
        if rs is None:
            return int(np.random.SeedSequence().entropy % (2 ** 63))
        if isinstance(rs, np.random.Generator):
            return int(rs.integers(0, 2 ** 63))
        return int(rs)

    def _init_run(self, g, r, seed, total_weight) -> _Run:
        rng = np.random.default_rng(np.random.SeedSequence([seed, r]))
        K = int(self.n_components)
        resp = self._initial_resp(g, K, rng)
        components = np.arange(K)
        eta, resp, keep = self._weights_and_drops(g, resp, components)
        dropped = []
        if keep is not None:
            dropped = [[0, int(c)] for c in np.setdiff1d(components, components[keep])]
            components = components[keep]
        W = bk.expand_record_weights(resp, g.annotator_offsets, g.record_weight,
                                     g.annotator_weight)
        self.family_.initialize(g, W, rng)
        log_weights = np.log(eta)
        resp, loglik, _ = self._e_step(g, log_weights)
        obj = self._objective(loglik, log_weights)
        return _Run(restart=r, n_iter=0, log_weights=log_weights, resp=resp, loglik=loglik,
                    objective=obj, trace=[obj / total_weight], components=components,
                    dropped=dropped)

    def _warm_run(self, g, total_weight) -> _Run:
        log_weights = np.log(self.weights_)
        resp, loglik, _ = self._e_step(g, log_weights)
        obj = self._objective(loglik, log_weights)
        return _Run(restart=0, n_iter=0, log_weights=log_weights, resp=resp, loglik=loglik,
                    objective=obj, trace=[obj / total_weight],
                    components=np.arange(log_weights.shape[0]))

    def _iterate(self, g, run, total_weight, best, summaries, n_runs, callback, bar) -> _Run:
        fam = self.family_
        if bar is not None and run.n_iter:
            bar.update(run.n_iter)
        # The state of the last completed iteration, written if the fit is interrupted.
        self._snapshot = (run, fam.state_dict()) if self.checkpoint is not None else None
        while run.n_iter < self.max_iter and not run.converged:
            t0 = time.perf_counter()
            eta, resp, keep = self._weights_and_drops(g, run.resp, run.components)
            W = bk.expand_record_weights(resp, g.annotator_offsets, g.record_weight,
                                         g.annotator_weight)
            t1 = time.perf_counter()
            if keep is not None:
                fam.keep_components(keep)
            fam.m_step(g, W)
            t2 = time.perf_counter()
            log_weights = np.log(eta)
            new_resp, loglik, _ = self._e_step(g, log_weights)
            t3 = time.perf_counter()
            obj = self._objective(loglik, log_weights)
            n_iter = run.n_iter + 1
            change = obj / total_weight - run.trace[-1]
            dropped = run.dropped
            components = run.components
            if keep is not None:
                dropped = dropped + [[n_iter, int(c)] for c in
                                     np.setdiff1d(components, components[keep])]
                components = components[keep]
            run = _Run(restart=run.restart, n_iter=n_iter, log_weights=log_weights,
                       resp=new_resp, loglik=loglik, objective=obj,
                       trace=run.trace + [obj / total_weight],
                       converged=keep is None and abs(change) < self.tol,
                       components=components, dropped=dropped)
            self.timings_["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t3)
            self.timings_["m_step"] += t2 - t1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(restart=run.restart, lower_bound=f"{run.trace[-1]:.6g}")
            if self.verbose >= 2:
                msg = (f"restart {run.restart} iteration {n_iter}: lower bound "
                       f"{run.trace[-1]:.10g} (change {change:+.3g})")
                (bar.write if bar is not None else print)(msg)
            if self.checkpoint is not None:
                self._snapshot = (run, fam.state_dict())
                if n_iter % self.checkpoint_every == 0:
                    self._save_checkpoint(g, best, summaries, run, run.restart, n_runs,
                                          run_family=self._snapshot[1])
            if callback is not None:
                callback({"restart": run.restart, "iteration": n_iter, "objective": obj,
                          "lower_bound": run.trace[-1], "change": change,
                          "weights": np.exp(log_weights)})
        if bar is not None:
            bar.update(self.max_iter - run.n_iter)
        return run

    def _set_fitted(self, best, summaries, g):
        run = best["run"]
        self.family_.load_state_dict(best["family"])
        self.weights_ = np.exp(run.log_weights)
        self.responsibilities_ = run.resp
        self.loglik_ = float(run.loglik)
        self.objective_ = float(run.objective)
        self.log_prior_ = float(run.objective - run.loglik)
        self.lower_bound_ = float(run.trace[-1])
        self.lower_bounds_ = np.asarray(run.trace)
        self.converged_ = bool(run.converged)
        self.n_iter_ = int(run.n_iter)
        self.n_components_ = int(run.log_weights.shape[0])
        self.dropped_components_ = [list(x) for x in run.dropped]
        self.restarts_ = list(summaries)
        self._n_annotators_fit = float(g.annotator_total)

    # ------------------------------------------------------------------------------------
    # Using the fit

    def _posterior(self, data):
        """(resp (H, K), loglik, per-annotator loglik (H,), grouped data) on ``data``."""
        self._check_fitted()
        data = self._as_data(data)
        g = data.grouped()
        self.family_.check_data(g, fitting=False)
        if not hasattr(self, "timings_"):
            self.timings_ = dict.fromkeys(
                ("init", "logps", "e_step", "m_step", "bookkeeping", "checkpoint"), 0.0)
        resp, loglik, per = self._e_step(g, np.log(self.weights_))
        return resp, loglik, per, g

    def predict_proba(self, data=None) -> np.ndarray:
        """(H, K) posterior of each annotator over the types: the fitted responsibilities for
        data=None, else an E-step on ``data`` (row h: annotator h of that data)."""
        if data is None:
            self._check_fitted()
            if getattr(self, "responsibilities_", None) is None:
                raise RuntimeError("predict_proba: no training responsibilities; pass data")
            return self.responsibilities_
        return self._posterior(data)[0]

    def predict(self, data=None) -> np.ndarray:
        """(H,) most probable type of each annotator."""
        return np.argmax(self.predict_proba(data), axis=1)

    def fit_predict(self, data, **kwargs) -> np.ndarray:
        return self.fit(data, **kwargs).predict()

    def score_samples(self, data) -> np.ndarray:
        """(H,) log-likelihood of each annotator's records, log sum_k eta_k p(records | k)
        (one annotator, not multiplied by its weight)."""
        return self._posterior(data)[2]

    def score(self, data) -> float:
        """Mean log-likelihood per record: weighted log-likelihood / number of records
        (after row expansion)."""
        _, loglik, _, g = self._posterior(data)
        return loglik / g.total_weight

    def n_parameters(self) -> int:
        """Free parameters: the family's plus K - 1 mixture weights."""
        self._check_fitted()
        return int(self.family_.n_parameters() + self.n_components_ - 1)

    def bic(self, data=None) -> float:
        """-2 loglik + n_parameters log(n), n = number of annotators (after expansion): the
        independent units of the mixture. data=None uses the fit's log-likelihood."""
        loglik, n = self._loglik_and_n(data)
        return -2.0 * loglik + self.n_parameters() * math.log(n)

    def aic(self, data=None) -> float:
        """-2 loglik + 2 n_parameters."""
        loglik, _ = self._loglik_and_n(data)
        return -2.0 * loglik + 2.0 * self.n_parameters()

    def _loglik_and_n(self, data):
        if data is None:
            self._check_fitted()
            if not hasattr(self, "_n_annotators_fit"):
                raise RuntimeError("no training data recorded; pass data")
            return self.loglik_, self._n_annotators_fit
        _, loglik, _, g = self._posterior(data)
        return loglik, g.annotator_total

    # ------------------------------------------------------------------------------------
    # Save / load / checkpoints

    def _restore_fitted(self, meta) -> None:
        """Subclass hook: restore extra fitted attributes saved by ``_fitted_state``."""

    _SKIP_PARAMS: tuple = ()   # parameters that cannot go to JSON (given again to load)

    def _params_json(self):
        meta, arrays = {}, {}
        for p in self._param_names():
            if p in self._SKIP_PARAMS:
                continue
            v = getattr(self, p)
            if isinstance(v, np.ndarray):
                arrays[f"param/{p}"] = v
                meta[p] = {"__array__": f"param/{p}"}
            elif isinstance(v, np.random.Generator):
                meta[p] = None   # the drawn seed is stored; resume is exact anyway
            elif isinstance(v, os.PathLike):
                meta[p] = os.fspath(v)
            elif isinstance(v, (np.integer, np.floating)):
                meta[p] = v.item()
            else:
                meta[p] = v
        return meta, arrays

    # Fitted attributes written by save (those a from_parameters model lacks are skipped).
    _FITTED_SCALARS = ("loglik_", "objective_", "log_prior_", "lower_bound_", "converged_",
                       "n_iter_", "n_components_", "dropped_components_", "restarts_")

    def _fitted_state(self):
        arrays = {"weights": self.weights_}
        for name in ("lower_bounds_", "responsibilities_"):
            if getattr(self, name, None) is not None:
                arrays[name.rstrip("_")] = getattr(self, name)
        for k, v in self.family_.state_dict().items():
            arrays[f"family/{k}"] = v
        meta = {name: getattr(self, name) for name in self._FITTED_SCALARS
                if hasattr(self, name)}
        meta["n_annotators_fit"] = getattr(self, "_n_annotators_fit", None)
        return meta, arrays

    @staticmethod
    def _run_arrays(prefix, run: _Run):
        return {f"{prefix}/log_weights": run.log_weights, f"{prefix}/resp": run.resp,
                f"{prefix}/trace": np.asarray(run.trace), f"{prefix}/components": run.components}

    @staticmethod
    def _run_meta(run: _Run):
        return {"restart": run.restart, "n_iter": run.n_iter, "loglik": run.loglik,
                "objective": run.objective, "converged": run.converged, "dropped": run.dropped}

    @staticmethod
    def _run_from(meta, arrays, prefix) -> _Run:
        return _Run(restart=meta["restart"], n_iter=meta["n_iter"],
                    log_weights=arrays[f"{prefix}/log_weights"], resp=arrays[f"{prefix}/resp"],
                    loglik=meta["loglik"], objective=meta["objective"],
                    trace=arrays[f"{prefix}/trace"].tolist(), converged=meta["converged"],
                    components=arrays[f"{prefix}/components"],
                    dropped=[list(x) for x in meta["dropped"]])

    def _write(self, path, status, meta_extra, arrays):
        from .. import __version__

        params, parr = self._params_json()
        meta = {"format": _FORMAT_VERSION, "class": type(self).__name__, "version": __version__,
                "status": status, "params": params, **meta_extra}
        arrays = {**parr, **arrays,
                  "__meta__": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    def _save_checkpoint(self, g, best, summaries, run, next_restart, n_runs, run_family=None):
        """In-progress state: the best finished run so far, the restart summaries, and the
        current run (None between restarts) with its family state."""
        if self.checkpoint is None:
            return
        t0 = time.perf_counter()
        meta = {"seed": self._fit_seed, "fingerprint": g.fingerprint(), "n_runs": n_runs,
                "next_restart": next_restart, "summaries": summaries, "best": None,
                "run": None}
        arrays = {}
        if best is not None:
            meta["best"] = self._run_meta(best["run"])
            arrays.update(self._run_arrays("best", best["run"]))
            arrays.update({f"best_family/{k}": v for k, v in best["family"].items()})
        if run is not None:
            meta["run"] = self._run_meta(run)
            arrays.update(self._run_arrays("run", run))
            fam = run_family if run_family is not None else self.family_.state_dict()
            arrays.update({f"run_family/{k}": v for k, v in fam.items()})
        self._write(self.checkpoint, "in_progress", meta, arrays)
        self.timings_["checkpoint"] += time.perf_counter() - t0

    def save(self, path) -> None:
        """Write the fitted model (parameters, fitted attributes, the family's state) to one
        .npz file: NumPy arrays plus a JSON header, no pickled objects."""
        self._check_fitted()
        meta, arrays = self._fitted_state()
        self._write(path, "fitted", {"fitted": meta}, arrays)

    @classmethod
    def load(cls, path, **params):
        """Read a model written by :meth:`save`, or a checkpoint of an unfinished fit (then
        ``fit(data)`` on the result resumes it on the same data). ``params`` override or
        supply parameters that were not stored (e.g. a family object)."""
        path = os.fspath(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if "__meta__" not in arrays:
            raise ValueError(f"{path}: not an emdpo_core model file (no __meta__ entry)")
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{path}: holds a {meta.get('class')}, not a {cls.__name__}")
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{path}: format {meta.get('format')} is not supported "
                             f"(expected {_FORMAT_VERSION})")
        kw = {}
        for p, v in meta["params"].items():
            kw[p] = arrays[v["__array__"]] if isinstance(v, dict) and "__array__" in v else v
        kw.update(params)
        est = cls(**kw)
        est.family_ = est._make_family()

        def sub(prefix):
            n = len(prefix) + 1
            return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}

        if meta["status"] == "fitted":
            f = meta["fitted"]
            est.family_.load_state_dict(sub("family"))
            est.weights_ = arrays["weights"]
            est.responsibilities_ = arrays.get("responsibilities")
            if "lower_bounds" in arrays:
                est.lower_bounds_ = arrays["lower_bounds"]
            for name in cls._FITTED_SCALARS:
                if name in f:
                    setattr(est, name, f[name])
            if f.get("n_annotators_fit") is not None:
                est._n_annotators_fit = f["n_annotators_fit"]
            est._restore_fitted(f)
        elif meta["status"] == "in_progress":
            best = None
            if meta["best"] is not None:
                best = {"run": cls._run_from(meta["best"], arrays, "best"),
                        "family": sub("best_family")}
            run = cls._run_from(meta["run"], arrays, "run") if meta["run"] is not None else None
            est._pending = {"seed": meta["seed"], "fingerprint": meta["fingerprint"],
                            "n_runs": meta["n_runs"], "next_restart": meta["next_restart"],
                            "summaries": meta["summaries"], "best": best, "run": run,
                            "run_family": sub("run_family") if run is not None else None}
        else:
            raise ValueError(f"{path}: unknown status {meta['status']!r}")
        return est


def _kmeans_plus_plus(X, weight, K, rng):
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


class PlackettLuceMixture(EMEstimator):
    """Mixture of Plackett-Luce models fitted by EM: EM-DPO with tabular policies.

    Each of K latent types ranks items by Plackett-Luce with its own worths exp(theta_k);
    annotator h has type k with probability eta_k, and all of h's records come from that
    type. This is EM-DPO (DESIGN.md) with tabular policies, a uniform reference policy and
    beta = 1: type k's DPO reward of item j is log pi_k(j) - log pi_ref(j) = theta_kj + const,
    and the constant cancels in every Plackett-Luce term. The E-step is the compiled fused
    kernel on theta[:, items]; the M-step is ``mm_iter`` steps of Hunter's (2004) monotone MM
    algorithm for weighted Plackett-Luce (see :class:`TabularPolicies`, which also explains
    the pseudo-count), so the objective (``lower_bounds_``) never decreases.

    Args:
        n_components: K.
        pseudo_count: c >= 0 virtual wins and losses of every item against a dummy item of
            worth 1, per type (log prior c sum_i (theta_i - 2 log(1 + e^theta_i))); keeps
            never-chosen items finite. 0 = maximum likelihood (every item must be chosen at
            least once). The default 0.01 moves the log-likelihood of data with a few hundred
            records by much less than 0.01 per record.
        mm_iter: MM steps per M-step.
        newton: True, False or "auto" (the default: True for at most NEWTON_MAX_ITEMS = 256
            items): follow every MM step by a safeguarded Newton step that is kept only when
            it increases the M-step objective (see :class:`TabularPolicies`). Without it, fits
            whose maximum-likelihood worths of some items go to 0 for a type approach the
            maximum only like 1 / iterations.
        Other parameters: see :class:`EMEstimator`.

    Fitted attributes: those of :class:`EMEstimator`, plus ``log_worths_`` (K, n_items),
    each row centered to mean 0, and ``n_items_``.

    Example:
        >>> import emdpo_core as ec
        >>> truth = ec.PlackettLuceMixture.from_parameters(
        ...     [[3.0, 2, 1, 0, -1, -2], [-2.0, -1, 0, 1, 2, 3]], [0.5, 0.5])
        >>> data, types = truth.sample(400, random_state=0)
        >>> model = ec.PlackettLuceMixture(2, random_state=0).fit(data)
        >>> sorted(model.weights_.round(1).tolist())
        [0.5, 0.5]
    """

    _m_step_remedy = "raise mm_iter,"

    def __init__(self, n_components: int = 1, *, max_iter: int = 500, tol: float = 1e-6,
                 n_init: int = 1, init_params="kmeans", random_state=None,
                 warm_start: bool = False, verbose: int = 0, alpha: float = 1.0,
                 min_weight="auto", pseudo_count: float = 0.01, mm_iter: int = 1,
                 newton="auto", checkpoint=None, checkpoint_every: int = 10):
        super().__init__(n_components, max_iter=max_iter, tol=tol, n_init=n_init,
                         init_params=init_params, random_state=random_state,
                         warm_start=warm_start, verbose=verbose, alpha=alpha,
                         min_weight=min_weight, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every)
        self.pseudo_count = pseudo_count
        self.mm_iter = mm_iter
        self.newton = newton

    def _check_params(self):
        super()._check_params()
        _check_float("pseudo_count", self.pseudo_count, 0.0)
        _check_int("mm_iter", self.mm_iter, 1)
        if not (isinstance(self.newton, (bool, np.bool_)) or
                (isinstance(self.newton, str) and self.newton == "auto")):
            raise ValueError(f"newton: expected True, False or 'auto', got {self.newton!r}")

    def _make_family(self) -> TabularPolicies:
        return TabularPolicies(pseudo_count=float(self.pseudo_count), mm_iter=int(self.mm_iter),
                               newton=self.newton if isinstance(self.newton, str)
                               else bool(self.newton))

    def _as_data(self, data) -> RankingData:
        if not isinstance(data, RankingData):
            raise TypeError(f"data: expected a RankingData, got {type(data).__name__}; build one "
                            f"with RankingData.from_rankings, from_preflib or from_jsonl")
        return data

    def _data_warnings(self, data) -> List[str]:
        return diagnostics.identifiability(data, int(self.n_components)).warnings

    @property
    def log_worths_(self) -> np.ndarray:
        self._check_fitted()
        t = self.family_.log_worths
        return t - t.mean(axis=1, keepdims=True)

    @property
    def n_items_(self) -> int:
        self._check_fitted()
        return self.family_.n_items

    @classmethod
    def from_parameters(cls, log_worths, weights, **params) -> "PlackettLuceMixture":
        """A model with the given parameters, as if fitted (no training data): for sampling
        planted data and for the posterior under known parameters.

        log_worths: (K, n_items) finite; weights: (K,) positive (normalized here)."""
        t = np.array(log_worths, dtype=np.float64, ndmin=2)
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if t.ndim != 2 or t.shape[1] < 2 or not np.all(np.isfinite(t)):
            raise ValueError(f"log_worths: expected a finite (K, n_items >= 2) array, got "
                             f"shape {t.shape}")
        if w.shape != (t.shape[0],) or not np.all(np.isfinite(w)) or not np.all(w > 0):
            raise ValueError(f"weights: expected {t.shape[0]} positive finite weights, got "
                             f"{w.tolist()}")
        est = cls(t.shape[0], **params)
        est.family_ = est._make_family()
        est.family_.load_state_dict({"log_worths": t})
        est.weights_ = w / w.sum()
        est.responsibilities_ = None
        est.n_components_ = t.shape[0]
        return est

    def sample(self, n_annotators: int, *, records_per_annotator: int = 1,
               candidate_size: Optional[int] = None, n_ranked: Optional[int] = None,
               random_state=None):
        """Draw annotators and their rankings from the fitted mixture.

        Each annotator draws a type from ``weights_``; each of its records draws a candidate
        set of ``candidate_size`` distinct items (default all items) uniformly and ranks it
        by Plackett-Luce (Gumbel-max: sort theta + Gumbel noise), observed to depth
        ``n_ranked`` (default full rankings).

        Returns:
            (RankingData, types): types (n_annotators,) int64, the type of each annotator.
            ``annotator`` is set when records_per_annotator > 1.
        """
        self._check_fitted()
        H = _check_int("n_annotators", n_annotators, 1)
        R = _check_int("records_per_annotator", records_per_annotator, 1)
        n = self.family_.n_items
        m = n if candidate_size is None else _check_int("candidate_size", candidate_size, 2)
        if m > n:
            raise ValueError(f"candidate_size: expected at most n_items={n}, got {m}")
        L = m - 1 if n_ranked is None else _check_int("n_ranked", n_ranked, 1)
        if L > m - 1:
            raise ValueError(f"n_ranked: expected at most candidate_size - 1 = {m - 1}, got {L}")
        rng = np.random.default_rng(random_state)
        types = rng.choice(self.weights_.shape[0], size=H, p=self.weights_)
        rec_type = np.repeat(types, R)
        N = H * R
        if m == n:
            cand = np.broadcast_to(np.arange(n), (N, n))
        elif N * n <= 50_000_000:
            cand = np.argsort(rng.random((N, n)), axis=1)[:, :m]
        else:   # many items: no (N, n_items) temporary
            cand = np.stack([rng.choice(n, size=m, replace=False) for _ in range(N)])
        theta = self.family_.log_worths
        score = theta[rec_type[:, None], cand] + rng.gumbel(size=(N, m))
        order = np.argsort(-score, axis=1, kind="stable")
        items = np.take_along_axis(cand, order, axis=1).reshape(-1)
        offsets = np.arange(N + 1, dtype=np.int64) * m
        data = RankingData(items, offsets, np.full(N, L, dtype=np.int64),
                           annotator=np.repeat(np.arange(H), R) if R > 1 else None, n_items=n,
                           item_names=getattr(self, "item_names_", None))
        return data, types.astype(np.int64)

    def _on_fitted(self, data) -> None:
        self.item_names_ = data.item_names

    def _fitted_state(self):
        meta, arrays = super()._fitted_state()
        meta["item_names"] = getattr(self, "item_names_", None)
        return meta, arrays

    def _restore_fitted(self, meta):
        self.item_names_ = meta.get("item_names")


@dataclass
class ModelSelection:
    """Result of :func:`select_n_components`.

    rows: one dict per K: n_components, n_components_fitted, loglik, n_parameters, bic,
        aic, converged, n_iter.
    criterion: "bic" or "aic".
    best_n_components: the K with the lowest criterion.
    best_model: that fitted model.
    models: {K: fitted model}.
    """

    rows: List[dict]
    criterion: str
    best_n_components: int
    best_model: Any
    models: Dict[int, Any]

    def __str__(self) -> str:
        head = f"{'K':>3} {'K fit':>5} {'loglik':>14} {'params':>7} {'BIC':>14} {'AIC':>14}  conv"
        lines = [head]
        for r in self.rows:
            mark = " *" if r["n_components"] == self.best_n_components else ""
            lines.append(f"{r['n_components']:>3} {r['n_components_fitted']:>5} "
                         f"{r['loglik']:>14.3f} {r['n_parameters']:>7} {r['bic']:>14.3f} "
                         f"{r['aic']:>14.3f}  {'yes' if r['converged'] else 'no'}{mark}")
        return "\n".join(lines)


def select_n_components(data, n_components_range, *, criterion: str = "bic",
                        estimator=PlackettLuceMixture, **params) -> ModelSelection:
    """Fit one model per K in ``n_components_range`` and compare them by BIC or AIC.

    Args:
        data: the data (RankingData for the default estimator).
        n_components_range: iterable of K >= 1.
        criterion: "bic" (default) or "aic"; lower is better.
        estimator: the estimator class (default PlackettLuceMixture).
        params: passed to the estimator (max_iter, n_init, random_state, ...).

    Returns:
        A :class:`ModelSelection` (a table: ``print(result)``).

    Example:
        >>> import emdpo_core as ec
        >>> truth = ec.PlackettLuceMixture.from_parameters(
        ...     [[3.0, 2, 1, 0, -1, -2], [-2.0, -1, 0, 1, 2, 3]], [0.5, 0.5])
        >>> data, _ = truth.sample(400, random_state=0)
        >>> ec.select_n_components(data, [1, 2, 3], random_state=0).best_n_components
        2
    """
    if criterion not in ("bic", "aic"):
        raise ValueError(f"criterion: expected 'bic' or 'aic', got {criterion!r}")
    ks = [_check_int("n_components_range", k, 1) for k in n_components_range]
    if not ks:
        raise ValueError("n_components_range: expected at least one K, got none")
    rows, models = [], {}
    for k in ks:
        model = estimator(k, **params).fit(data)
        models[k] = model
        rows.append({"n_components": k, "n_components_fitted": model.n_components_,
                     "loglik": model.loglik_, "n_parameters": model.n_parameters(),
                     "bic": model.bic(), "aic": model.aic(), "converged": model.converged_,
                     "n_iter": model.n_iter_})
    best = min(rows, key=lambda r: (r[criterion], r["n_components"]))
    return ModelSelection(rows=rows, criterion=criterion,
                          best_n_components=best["n_components"],
                          best_model=models[best["n_components"]], models=models)
