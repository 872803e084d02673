"""Synthetic preference populations: the embedded default data of ``emdpo demo``.

A contextual bandit in the spirit of the experiments of Chidambaram, Seetharaman, Syrgkanis
(arXiv 2510.15716): P prompts, each with A candidate responses y described by feature vectors
phi(x, y) in R^D; K latent annotator types, type k with the linear reward
r_k(x, y) = u_k . phi(x, y); H annotators, each of one type; every record shows an annotator a
prompt and m of its A responses (a fresh random subset per record) and the annotator ranks
them by Plackett-Luce on its type's reward (Gumbel-max), observed to depth L (pairs: m = 2;
best-of-3: m = 3, L = 1; full rankings of 3: m = 3, L = 2).

With a reference policy pi_ref(y | x) and DPO temperature beta, type k's best policy, the
maximizer of its KL-regularized value

    J_k(pi) = E_x [ E_{y ~ pi(.|x)} r_k(x, y) - beta KL(pi(.|x) || pi_ref(.|x)) ],

is pi_k*(y | x) proportional to pi_ref(y | x) exp(r_k(x, y) / beta); a policy's regret for
type k is measured against it (:meth:`Population.regret`: the true reward lost, or the loss
in J_k, which is exactly beta E_x KL(q(.|x) || pi_k*(.|x))). The linear softmax policy
``LinearSoftmaxPolicy`` (a torch module, from :meth:`Population.policy_module`) contains
every pi_k*, so DPO on a type's records is consistent for it.

Nothing here imports torch except :meth:`Population.policy_module` and the attribute
``emdpo_core.datasets.LinearSoftmaxPolicy``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _checks
from .data import PreferenceData, RankingData

__all__ = [
    "Population",
    "make_population",
    "LinearSoftmaxPolicy",
    "adjusted_rand_index",
    "match_types",
    "policy_error",
]


def _check_positive(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or \
            not np.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    return float(x)


def _log_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def __getattr__(name):
    # LinearSoftmaxPolicy is a torch module: defined on first use so that importing this
    # module does not import torch.
    if name == "LinearSoftmaxPolicy":
        from ._torch_models import LinearSoftmaxPolicy

        return LinearSoftmaxPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Population:
    """A synthetic population of annotator types, with its training records.

    Attributes:
        features: (P, A, D) float64, phi(x, y) of response y of prompt x.
        type_rewards: (K, D) float64, u_k.
        type_weights: (K,) float64, share of each type among annotators.
        ref_logps: (P, A) float64, log pi_ref(y | x) (each row normalized).
        beta: DPO temperature of the KL-regularized values.
        annotator_types: (H,) int64, the type of each training annotator (empty without
            training records).
        data: the training records (:class:`~emdpo_core.PreferenceData`; None without them)
            with inputs ``prompt`` and ``response`` (int64 per slot), ``ref_logps`` and
            ``features`` (phi of each slot); annotator h of the data is annotator h here.
    """

    features: np.ndarray
    type_rewards: np.ndarray
    type_weights: np.ndarray
    ref_logps: np.ndarray
    beta: float
    annotator_types: np.ndarray
    data: Optional[PreferenceData] = None

    @property
    def n_types(self) -> int:
        return int(self.type_rewards.shape[0])

    @property
    def n_prompts(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_responses(self) -> int:
        return int(self.features.shape[1])

    @property
    def rewards(self) -> np.ndarray:
        """(K, P, A) true rewards r_k(x, y)."""
        return np.einsum("pad,kd->kpa", self.features, self.type_rewards)

    def optimal_logps(self) -> np.ndarray:
        """(K, P, A) log pi_k*(y | x) = log_softmax_y(log pi_ref(y | x) + r_k(x, y) / beta)."""
        return _log_softmax(self.ref_logps[None] + self.rewards / self.beta)

    # ------------------------------------------------------------------------------------
    # Records

    def sample(self, n_annotators: Optional[int] = None, *, types=None,
               records_per_annotator: int = 1, list_size: int = 3, n_ranked=None,
               prompts=None, random_state=None):
        """Draw annotators and their records.

        Each annotator has a type (drawn from ``type_weights``, or given by ``types``); each
        of its records draws a prompt uniformly (from ``prompts``, default all), a candidate set of ``list_size`` distinct
        responses of that prompt uniformly (a fresh set per record) and ranks it by
        Plackett-Luce on the type's reward (sort r_k + Gumbel noise), observed to depth
        ``n_ranked`` (default list_size - 1, a full ranking; 1 = best-of-m).

        Args:
            n_annotators: H (when ``types`` is not given).
            types: optional (H,) types of the annotators (e.g. ``annotator_types`` for new
                records of the training annotators).
            records_per_annotator, list_size (2 <= m <= A), n_ranked (1 <= L <= m - 1),
            prompts: optional prompt ids the records draw from (e.g. the training prompts,
                keeping the others held out); default all P.
            random_state: int, None or a numpy Generator.

        Returns:
            (PreferenceData, types (H,) int64). Records are grouped annotator by annotator;
            ``annotator`` is set when records_per_annotator > 1.
        """
        rng = np.random.default_rng(random_state)
        K, P, A = self.n_types, self.n_prompts, self.n_responses
        if types is None:
            if n_annotators is None:
                raise ValueError("n_annotators: give n_annotators or types")
            H = _checks.check_int("n_annotators", n_annotators, 1)
            types = rng.choice(K, size=H, p=self.type_weights)
        else:
            if n_annotators is not None:
                raise ValueError("n_annotators: give n_annotators or types, not both")
            types = np.asarray(types)
            if types.ndim != 1 or types.shape[0] < 1 or types.dtype.kind not in "iu":
                raise ValueError(f"types: expected a non-empty 1-D integer array, got shape "
                                 f"{types.shape} and dtype {types.dtype}")
            bad = np.flatnonzero((types < 0) | (types >= K))
            if bad.size:
                raise ValueError(f"types: expected types in [0, {K}), got {types[bad[0]]} at "
                                 f"index {bad[0]}")
            H = types.shape[0]
        R = _checks.check_int("records_per_annotator", records_per_annotator, 1)
        m = _checks.check_int("list_size", list_size, 2)
        if m > A:
            raise ValueError(f"list_size: expected at most n_responses = {A}, got {m}")
        L = m - 1 if n_ranked is None else _checks.check_int("n_ranked", n_ranked, 1)
        if L > m - 1:
            raise ValueError(f"n_ranked: expected at most list_size - 1 = {m - 1}, got {L}")
        prompts = self._check_prompts(prompts)
        N = H * R
        rec_type = np.repeat(types, R)
        prompt = rng.integers(0, P, size=N) if prompts is None else \
            prompts[rng.integers(0, prompts.shape[0], size=N)]
        cand = np.argsort(rng.random((N, A)), axis=1)[:, :m]
        reward = self.rewards[rec_type[:, None], prompt[:, None], cand]
        order = np.argsort(-(reward + rng.gumbel(size=(N, m))), axis=1, kind="stable")
        response = np.take_along_axis(cand, order, axis=1).reshape(-1)
        slot_prompt = np.repeat(prompt, m)
        data = PreferenceData(
            np.arange(N + 1, dtype=np.int64) * m,
            {"prompt": slot_prompt, "response": response},
            ref_logps=self.ref_logps[slot_prompt, response],
            n_ranked=np.full(N, L, dtype=np.int64),
            annotator=np.repeat(np.arange(H), R) if R > 1 else None,
            features=self.features[slot_prompt, response])
        return data, types.astype(np.int64)

    def to_ranking_data(self, data: PreferenceData) -> RankingData:
        """The tabular view of records of this population: item id = prompt * A + response
        (a tabular policy then has one free log-probability per prompt and response)."""
        items = data.inputs["prompt"] * self.n_responses + data.inputs["response"]
        annot = None if data.annotator is None else data.annotator_labels[data.annotator]
        return RankingData(items, data.offsets, data.n_ranked, annotator=annot,
                           sample_weight=data.sample_weight,
                           n_items=self.n_prompts * self.n_responses)

    # ------------------------------------------------------------------------------------
    # Evaluation against the truth

    def _check_prompts(self, prompts) -> Optional[np.ndarray]:
        """None, or distinct prompt ids in [0, P) as int64."""
        if prompts is None:
            return None
        p = np.asarray(prompts)
        if p.ndim != 1 or p.shape[0] < 1 or p.dtype.kind not in "iu":
            raise ValueError(f"prompts: expected a non-empty 1-D array of prompt ids, got shape "
                             f"{p.shape} and dtype {p.dtype}")
        bad = np.flatnonzero((p < 0) | (p >= self.n_prompts))
        if bad.size:
            raise ValueError(f"prompts: expected ids in [0, {self.n_prompts}), got {p[bad[0]]} at "
                             f"index {bad[0]}")
        if np.unique(p).shape[0] != p.shape[0]:
            raise ValueError("prompts: expected distinct prompt ids, got repeats")
        return p.astype(np.int64)

    def _check_policies(self, policy_logps) -> np.ndarray:
        lp = np.asarray(policy_logps, dtype=np.float64)
        if lp.ndim == 2:
            lp = lp[None]
        if lp.ndim != 3 or lp.shape[1:] != (self.n_prompts, self.n_responses):
            raise ValueError(f"policy_logps: expected shape (J, {self.n_prompts}, "
                             f"{self.n_responses}) or ({self.n_prompts}, {self.n_responses}), "
                             f"got {np.shape(policy_logps)}")
        if np.isnan(lp).any() or np.isposinf(lp).any():
            raise ValueError("policy_logps: expected log-probabilities (no NaN or +inf)")
        return lp

    def regret(self, policy_logps, weights=None, *, kind: str = "reward",
               mixture: str = "policy", prompts=None) -> np.ndarray:
        """(K,) true regret of each type when served one policy or a mixture of J policies.

        The served policy answers each request with policy j drawn with probability w_j (the
        sequence-level mixture of MMRA). Means over x are over ``prompts`` (default all P
        prompts, which records draw uniformly). Two measures, both from the simulator's true rewards r_k:

            kind="reward" (the authors' regret): the expected true reward the type loses
                against its own optimal policy pi_k*,
                    regret_k = E_x [ E_{pi_k*} r_k - sum_j w_j E_{pi_j} r_k ],
                linear in w; it can be negative (pi_k* trades reward for closeness to the
                reference). MMRA with kind="reward" estimates it from the policies'
                implicit rewards.
            kind="kl": the loss in the type's KL-regularized value J_k (module docstring),
                which also charges the divergence from the reference:
                mixture="policy": sum_j w_j (J_k(pi_k*) - J_k(pi_j))
                    = beta sum_j w_j E_x KL(pi_j || pi_k*), what MMRA with kind="kl"
                    estimates; mixture="output": J_k(pi_k*) - J_k(q) of the output
                    distribution q = sum_j w_j pi_j (never above "policy": KL is convex).

        Args:
            policy_logps: (J, P, A) log-probabilities of J policies (or (P, A) for one).
            weights: (J,) mixture weights (default: the one policy, or uniform).
            kind: "reward" or "kl"; mixture: "policy" or "output" (for kind="kl").
            prompts: optional prompt ids to average over (e.g. prompts held out from
                training); default all.
        """
        if kind not in ("reward", "kl"):
            raise ValueError(f"kind: expected 'reward' or 'kl', got {kind!r}")
        if mixture not in ("policy", "output"):
            raise ValueError(f"mixture: expected 'policy' or 'output', got {mixture!r}")
        lp = self._check_policies(policy_logps)
        J = lp.shape[0]
        w = np.full(J, 1.0 / J) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (J,) or not np.all(np.isfinite(w)) or np.any(w < 0) or \
                not abs(w.sum() - 1.0) < 1e-6:
            raise ValueError(f"weights: expected {J} probabilities summing to 1, got "
                             f"{np.asarray(weights).tolist()}")
        if kind == "reward" or mixture == "policy":
            return self.regret_matrix(lp, kind=kind, prompts=prompts) @ w
        prompts = self._check_prompts(prompts)
        opt = self.optimal_logps()                                     # (K, P, A)
        if prompts is not None:
            lp, opt = lp[:, prompts], opt[:, prompts]
        q = np.einsum("j,jpa->pa", w, np.exp(lp))
        logq = np.log(np.maximum(q, 1e-300))
        kl = np.sum(np.where(q > 0, q * (logq[None] - opt), 0.0), axis=2)    # (K, P)
        return self.beta * kl.mean(axis=1)

    def regret_matrix(self, policy_logps, *, kind: str = "reward", prompts=None) -> np.ndarray:
        """(K, J) true regret of type k under policy j alone (see :meth:`regret`):
        "reward": E_x [E_{pi_k*} r_k - E_{pi_j} r_k]; "kl": beta E_x KL(pi_j || pi_k*);
        means over ``prompts`` (default all)."""
        if kind not in ("reward", "kl"):
            raise ValueError(f"kind: expected 'reward' or 'kl', got {kind!r}")
        lp = self._check_policies(policy_logps)
        prompts = self._check_prompts(prompts)
        opt = self.optimal_logps()
        r = self.rewards                                                # (K, P, A)
        if prompts is not None:
            lp, opt, r = lp[:, prompts], opt[:, prompts], r[:, prompts]
        p = np.exp(lp)                                                  # (J, P', A)
        if kind == "reward":
            best = np.einsum("kpa,kpa->kp", np.exp(opt), r)
            got = np.einsum("jpa,kpa->kjp", p, r)
            return (best[:, None] - got).mean(axis=2)
        kl = np.einsum("jpa,jpa->jp", p, np.where(p > 0, lp, 0.0))[None] - \
            np.einsum("jpa,kpa->kjp", p, opt)
        return self.beta * kl.mean(axis=2)

    def pairwise_accuracy(self, policy_logps, data: PreferenceData) -> float:
        """Share of the ordered pairs of ``data``'s records (each ranked response against
        every response after it) that the policy orders the same way (ties count 1/2).
        policy_logps: (P, A) log-probabilities (or scores) of one policy."""
        lp = self._check_policies(policy_logps)
        if lp.shape[0] != 1:
            raise ValueError("policy_logps: expected one policy, shape (P, A)")
        score = lp[0][data.inputs["prompt"], data.inputs["response"]]
        right, total = 0.0, 0
        lengths = data.list_lengths
        for m in np.unique(lengths):
            rows = np.flatnonzero(lengths == m)
            s = score[data.offsets[rows][:, None] + np.arange(m)]      # (n, m)
            L = data.n_ranked[rows]
            for t in range(int(m) - 1):
                live = L > t
                d = s[live, t:t + 1] - s[live, t + 1:]
                right += float(np.sum(d > 0) + 0.5 * np.sum(d == 0))
                total += d.size
        return right / total

    # ------------------------------------------------------------------------------------
    # Policies

    def policy_module(self, logits=None, *, dtype="float64"):
        """A :class:`LinearSoftmaxPolicy` over this population's features (torch):
        log pi(y | x) = log_softmax_y(log pi_ref(y | x) + phi(x, y) . theta), theta = 0 (the
        reference policy) unless ``logits`` gives theta (D,)."""
        import torch

        from ._torch_models import LinearSoftmaxPolicy

        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        module = LinearSoftmaxPolicy(torch.as_tensor(self.features, dtype=dt),
                                     torch.as_tensor(self.ref_logps, dtype=dt))
        if logits is not None:
            with torch.no_grad():
                module.theta.copy_(torch.as_tensor(np.asarray(logits), dtype=dt))
        return module


def make_population(n_types: int = 3, *, n_annotators: Optional[int] = 500,
                    records_per_annotator: int = 5, list_size: int = 3, n_ranked=None,
                    n_prompts: int = 100, n_responses: int = 8, n_features: int = 6,
                    reward_scale: float = 2.0, type_rewards=None, type_weights=None,
                    polarized: bool = False, reference="uniform", beta: float = 1.0,
                    random_state=None) -> Population:
    """A synthetic contextual-bandit population of annotator types and its records.

    Draws features phi(x, y) ~ N(0, I_D) for P prompts x A responses, type reward vectors u_k
    of norm ``reward_scale`` (so rewards have standard deviation about reward_scale) in random
    directions (or ``type_rewards``; with ``polarized=True`` two opposed types, u_1 = -u_0),
    then H annotators with types drawn from ``type_weights`` and their records
    (:meth:`Population.sample`). Deterministic given ``random_state``.

    Args:
        n_types: K.
        n_annotators, records_per_annotator, list_size, n_ranked: the training records
            (pairs: list_size=2; best-of-3: list_size=3, n_ranked=1; rankings of 3:
            list_size=3). n_annotators=None: no records (``data`` is None; draw them with
            :meth:`Population.sample`).
        n_prompts, n_responses, n_features: P, A, D.
        reward_scale: norm of each drawn u_k.
        type_rewards: optional (K, D) reward vectors (then n_features = D and reward_scale is
            unused).
        type_weights: optional (K,) positive shares of the types (normalized); default equal.
        polarized: K = 2 opposed types (u_1 = -u_0).
        reference: "uniform" or a (P, A) array of reference log-probabilities (a fixed
            policy; each row is normalized).
        beta: DPO temperature (regrets and the optimal policies use it).
        random_state: int, None or a numpy Generator.

    Example:
        >>> from emdpo_core.datasets import make_population
        >>> pop = make_population(2, polarized=True, n_prompts=1, n_responses=6,
        ...                       n_annotators=100, random_state=0)
        >>> pop.data.n_records, pop.rewards.shape
        (500, (2, 1, 6))
        >>> pop.regret(pop.optimal_logps()[0]).round(3).tolist()   # type 0's best policy
        [0.0, 4.937]
    """
    K = _checks.check_int("n_types", n_types, 1)
    rng = np.random.default_rng(random_state)
    P = _checks.check_int("n_prompts", n_prompts, 1)
    A = _checks.check_int("n_responses", n_responses, 2)
    beta = _check_positive("beta", beta)
    if type_rewards is not None:
        u = np.array(type_rewards, dtype=np.float64, ndmin=2)
        if u.shape[0] != K or not np.all(np.isfinite(u)):
            raise ValueError(f"type_rewards: expected a finite ({K}, D) array, got shape "
                             f"{u.shape}")
        if polarized:
            raise ValueError("polarized: give type_rewards or polarized=True, not both")
        D = u.shape[1]
    else:
        D = _checks.check_int("n_features", n_features, 1)
        scale = _check_positive("reward_scale", reward_scale)
        if polarized:
            if K != 2:
                raise ValueError(f"polarized: needs n_types=2, got {K}")
            u0 = rng.normal(size=D)
            u = np.stack([u0, -u0])
        else:
            u = rng.normal(size=(K, D))
        u *= scale / np.linalg.norm(u, axis=1, keepdims=True)
    if type_weights is None:
        w = np.full(K, 1.0 / K)
    else:
        w = np.asarray(type_weights, dtype=np.float64)
        if w.shape != (K,) or not np.all(np.isfinite(w)) or not np.all(w > 0):
            raise ValueError(f"type_weights: expected {K} positive finite numbers, got "
                             f"{np.asarray(type_weights).tolist()}")
        w = w / w.sum()
    features = rng.normal(size=(P, A, D))
    if isinstance(reference, str):
        if reference != "uniform":
            raise ValueError(f"reference: expected 'uniform' or a ({P}, {A}) array of "
                             f"log-probabilities, got {reference!r}")
        ref = np.full((P, A), -np.log(A))
    else:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != (P, A) or not np.all(np.isfinite(ref)):
            raise ValueError(f"reference: expected a finite ({P}, {A}) array of "
                             f"log-probabilities, got shape {ref.shape}")
        ref = _log_softmax(ref)
    pop = Population(features=features, type_rewards=u, type_weights=w, ref_logps=ref,
                     beta=beta, annotator_types=np.zeros(0, dtype=np.int64))
    if n_annotators is not None:
        pop.data, pop.annotator_types = pop.sample(
            n_annotators, records_per_annotator=records_per_annotator, list_size=list_size,
            n_ranked=n_ranked, random_state=rng)
    return pop


# ----------------------------------------------------------------------------------------
# Comparing learned types with the truth


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie 1985): 1 for identical
    partitions (up to relabelling), about 0 for independent ones.

    Example:
        >>> from emdpo_core.datasets import adjusted_rand_index
        >>> adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0])
        1.0
    """
    a = np.asarray(labels_true).reshape(-1)
    b = np.asarray(labels_pred).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"labels_pred: expected the shape of labels_true {a.shape}, got "
                         f"{b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai.reshape(-1), bi.reshape(-1)), 1.0)

    def pairs(x):
        return float(np.sum(x * (x - 1.0) / 2.0))

    n = a.size
    index = pairs(table)
    ra, rb = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = ra * rb / (n * (n - 1.0) / 2.0) if n > 1 else 0.0
    top = (ra + rb) / 2.0
    if top == expected:     # both partitions trivial (one cluster, or all singletons)
        return 1.0
    return float((index - expected) / (top - expected))


def match_types(cost) -> np.ndarray:
    """Best matching of true types (rows) to learned types (columns) for a (K_true,
    K_learned) cost matrix: (K_true,) learned index of each true type, minimizing the total
    cost; distinct learned types when K_learned >= K_true, else each true type takes its
    cheapest learned type. Exhaustive (types are few)."""
    C = np.asarray(cost, dtype=np.float64)
    Kt, Kl = C.shape
    if Kl < Kt:
        return np.argmin(C, axis=1)
    best, best_cost = None, np.inf
    for perm in itertools.permutations(range(Kl), Kt):
        c = float(C[np.arange(Kt), perm].sum())
        if c < best_cost:
            best, best_cost = perm, c
    return np.asarray(best, dtype=np.int64)


def policy_error(learned_logps, true_logps) -> float:
    """Mean total-variation distance between learned and true type policies after the best
    matching of types: (1/K) sum_k mean_x TV(pi_hat_{m(k)}(.|x), pi_k(.|x)).

    Args:
        learned_logps: (K_learned, P, A) (or (K_learned, A)) log-probabilities.
        true_logps: (K, P, A) (or (K, A)).
    """
    lp = np.asarray(learned_logps, dtype=np.float64)
    tp = np.asarray(true_logps, dtype=np.float64)
    if lp.ndim == 2:
        lp = lp[:, None]
    if tp.ndim == 2:
        tp = tp[:, None]
    if lp.shape[1:] != tp.shape[1:]:
        raise ValueError(f"learned_logps: expected shape (K, {', '.join(map(str, tp.shape[1:]))}"
                         f"), got {np.shape(learned_logps)}")
    tv = 0.5 * np.abs(np.exp(tp)[:, None] - np.exp(lp)[None]).sum(axis=3).mean(axis=2)
    match = match_types(tv)
    return float(tv[np.arange(tp.shape[0]), match].mean())
