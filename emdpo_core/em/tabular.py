"""The exact tabular family: one Plackett-Luce worth vector per type with Hunter's MM M-step
(optionally Newton steps), and :class:`PlackettLuceMixture`, the EM engine with that family."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from . import _initialization
from . import _plackett_luce_mm as bk
from .. import _checks, diagnostics
from ..data import GroupedRankings, RankingData
from ..distributed import Statistics, check_same
from .engine import EMEstimator
from .family import PolicyFamily, PolicyLogps, PolicySamples

__all__ = ["TabularPolicies", "PlackettLuceMixture"]


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


class TabularPolicies(PolicyFamily):
    """Tabular policies over a finite item set: one Plackett-Luce worth vector per type.

    With a uniform reference policy and beta = 1 a tabular policy's reward for item j is its
    log-probability log pi_k(j) = theta_kj - log Z_k, and a per-type constant cancels in every
    Plackett-Luce term, so type k's policy log-probability of slot j can be taken as
    ``theta[k, items[j]]``: EM-DPO with tabular policies *is* EM for a mixture of
    Plackett-Luce models (Gormley and Murphy 2008).

    M-step: ``mm_iter`` steps of Hunter's (2004) minorization-maximization algorithm for the
    weighted Plackett-Luce likelihood, each monotone (see ``em._plackett_luce_mm.pl_mm_step``),
    so the EM is a generalized EM whose objective never decreases, whatever ``mm_iter``.

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

    supports_process_group = True

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
        if fitting:
            check_same(self.comm, "data", int(data.n_items), "n_items")
        if fitting and self.log_worths is None:
            # one worth per item id and type: ids far beyond what the data holds would make
            # the fit's cost grow with the largest id (RankingData itself keeps sparse ids)
            try:
                _checks.check_id_bound("items", data.n_items - 1, data.n_slots)
            except ValueError as e:
                raise ValueError(f"data: {e} (tabular policies hold a worth per item id "
                                 f"and type)") from None
        if fitting and self.log_worths is not None and data.n_items != self.n_items:
            # a warm start (or a resumed fit) continues from worths over the model's items;
            # the MM step indexes the data's per-item sums by them
            raise ValueError(f"data: has n_items={data.n_items} but the model was fitted on "
                             f"{self.n_items} items; a warm start continues with the same "
                             f"items: give the data n_items={self.n_items} (RankingData(..., "
                             f"n_items={self.n_items}))")
        if fitting and self.pseudo_count == 0.0:
            first = np.repeat(data.offsets[:-1], data.n_ranked) + \
                _ranges(data.n_ranked)
            chosen = self.comm.sum(np.bincount(data.items[first], minlength=data.n_items)) > 0
            never = np.flatnonzero(~chosen)
            if never.size:
                raise ValueError(
                    f"pseudo_count=0 (maximum likelihood) needs every item to be chosen at "
                    f"least once, but item {never[0]} ({never.size} item(s) in all) is never "
                    f"ranked above another: its maximum-likelihood worth is 0; use "
                    f"pseudo_count > 0")

    def annotator_features(self, data, max_features: int = 256) -> np.ndarray:
        """Mean normalized position of each item per annotator (see
        ``em._initialization.position_features``), over the ``max_features`` most shown
        items."""
        shown = self.comm.sum(np.bincount(data.items, minlength=data.n_items))
        cols = np.argsort(-shown, kind="stable")[:max_features]
        cols = cols[shown[cols] > 0]
        column_of = np.full(data.n_items, -1, dtype=np.int64)
        column_of[cols] = np.arange(cols.shape[0])
        return _initialization.position_features(data.items, data.offsets, data.n_ranked,
                                    data.annotator_offsets, data.record_weight, column_of,
                                    cols.shape[0])

    def _anchor(self, theta):
        if self.pseudo_count == 0.0:
            # Scale-free: anchor the largest log-worth at 0 and keep the rest within range.
            theta -= theta.max(axis=1, keepdims=True)
            np.maximum(theta, -LOG_WORTH_RANGE, out=theta)
        return theta

    def _mm(self, data, weights, wins):
        # The record sums (denominators; wins are given) are added over the ranks of a
        # distributed fit before the update, which every rank then makes alike.
        denom = self.comm.sum(bk.pl_mm_denominators(data.items, data.offsets, data.n_ranked,
                                                    weights, self.log_worths, data.m_max))
        return self._anchor(bk.pl_mm_update(wins, denom, self.log_worths, self.pseudo_count))

    def _wins(self, data, weights):
        return self.comm.sum(bk.pl_wins(data.items, data.offsets, data.n_ranked, weights,
                                        data.n_items))

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
        return self.comm.sum(bk.pl_scaled_loglik(data.items, data.offsets, data.n_ranked,
                                                 weights, theta, data.m_max)) + \
            self._log_prior_rows(theta)

    def _newton(self, data, weights, theta):
        """theta after one safeguarded Newton step on Q_k per type (see the class
        docstring); a type whose step does not increase Q_k keeps its theta."""
        q0, grad, hess = bk.pl_grad_hess(data.items, data.offsets, data.n_ranked, weights,
                                         theta, data.m_max)
        if self.comm.world_size > 1:      # sums over records: add the ranks' in one reduction
            st = Statistics().add("q", q0).add("grad", grad).add("hess", hess).sync(self.comm)
            q0, grad, hess = st["q"], st["grad"], st["hess"]
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
        wins = self._wins(data, weights)
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
        wins = self._wins(data, weights)
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
        lw = np.asarray(state["log_worths"])
        if lw.dtype.kind != "f":
            raise TypeError(f"log_worths: expected floating-point values, got dtype {lw.dtype}")
        if lw.ndim != 2 or lw.shape[0] < 1 or lw.shape[1] < 2:
            raise ValueError(f"log_worths: expected shape (K, n_items) with K >= 1 and "
                             f"n_items >= 2, got {lw.shape}")
        bad = np.flatnonzero(~np.isfinite(lw.reshape(-1)))
        if bad.size:
            k, j = divmod(int(bad[0]), lw.shape[1])
            raise ValueError(f"log_worths: non-finite value {lw[k, j]} at [type {k}, item {j}]")
        self.log_worths = np.ascontiguousarray(lw, dtype=np.float64)

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


class PlackettLuceMixture(EMEstimator):
    """Mixture of Plackett-Luce models fitted by EM: EM-DPO with tabular policies.

    Each of K latent types ranks items by Plackett-Luce with its own worths exp(theta_k);
    annotator h has type k with probability eta_k, and all of h's records come from that
    type. This is EM-DPO (docs/math.md) with tabular policies, a uniform reference policy and
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
        super().__init__(**self._engine_args(locals()))
        self.pseudo_count = pseudo_count
        self.mm_iter = mm_iter
        self.newton = newton

    def _check_params(self):
        super()._check_params()
        _checks.check_float("pseudo_count", self.pseudo_count, 0.0)
        _checks.check_int("mm_iter", self.mm_iter, 1)
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

    def _data_notes(self, data) -> List[str]:
        return diagnostics.identifiability(data, int(self.n_components)).notes

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
        H = _checks.check_int("n_annotators", n_annotators, 1)
        R = _checks.check_int("records_per_annotator", records_per_annotator, 1)
        n = self.family_.n_items
        m = n if candidate_size is None else _checks.check_int("candidate_size", candidate_size, 2)
        if m > n:
            raise ValueError(f"candidate_size: expected at most n_items={n}, got {m}")
        L = m - 1 if n_ranked is None else _checks.check_int("n_ranked", n_ranked, 1)
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
