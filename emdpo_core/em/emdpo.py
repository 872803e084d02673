"""EM-DPO: EM over latent annotator types with one DPO policy per type, and its baselines.

:class:`EMDPO` is the EM engine of :mod:`emdpo_core.em` (E-step = the fused compiled kernel
over the policies' cached log-probabilities; mixture weights, restarts, checkpoints, progress
output) with a policy family:

- :class:`TorchPolicies`: K torch modules. M-step = optimizer steps on the weighted listwise
  DPO loss of :mod:`emdpo_core.torch` (all types at once with ``mixture_dpo_loss``, or one
  type after the other), warm-started across EM iterations or reset to the initial
  (reference) policy every M-step; E-step = every slot's log-probability under every policy,
  recomputed after each M-step in batches without gradients, then the fused kernel.
- :class:`~emdpo_core.TabularPolicies`: one Plackett-Luce worth vector per type with the exact
  monotone MM M-step (then EMDPO is :class:`~emdpo_core.PlackettLuceMixture`).

Baselines (Chidambaram, Seetharaman, Syrgkanis, arXiv 2405.15065 and 2510.15716): single DPO
is ``EMDPO(n_components=1)``; cluster-DPO (annotators clustered once, one DPO policy trained
per cluster with hard assignments, no EM) is :meth:`EMDPO.fit_cluster_dpo`. It is also EM's
initialization: ``fit`` starts from the same clustering, smoothed, and then iterates.

:meth:`EMDPO.aggregate` turns the K fitted policies into one by MinMax Regret Aggregation:
it samples responses from each policy, caches every policy's log-probabilities of them and
solves :func:`emdpo_core.mmra` on :func:`emdpo_core.regret_matrix`.

:class:`TorchPolicies` lives in :mod:`emdpo_core.em.torch_policies`; torch is imported only
when one is made.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from . import _mixture
from .. import _checks, diagnostics
from ..data import PreferenceData, RankingData
from .engine import EMEstimator
from .family import PolicyFamily
from .persistence import _Run
from .tabular import TabularPolicies
from .torch_policies import TorchPolicies

__all__ = ["EMDPO", "TorchPolicies", "AggregationResult"]

@dataclass
class AggregationResult:
    """Result of :meth:`EMDPO.aggregate`.

    weights: (K,) MMRA mixture weights over the fitted policies.
    max_regret: the LP's worst-type regret max_k c_k (R w)_k (estimated from the samples).
    regrets: (K,) R @ weights, each type's estimated regret under the mixture.
    regret_matrix: (K, K) R[k, j] = estimated regret of type k served by policy j.
    kind: "kl" or "reward" (see :func:`emdpo_core.regret_matrix`).
    status: the solver's status.
    """

    weights: np.ndarray
    max_regret: float
    regrets: np.ndarray
    regret_matrix: np.ndarray
    kind: str
    status: str


class EMDPO(EMEstimator):
    """EM-DPO: latent annotator types, one DPO policy per type (scikit-learn style).

    EM over the types of the annotators (docs/math.md): the E-step computes each
    annotator's posterior over the K types from all of its records (the fused kernel on the
    policies' cached log-probabilities), the M-step trains each type's policy on the weighted
    listwise DPO loss with weights w_ik = c_i g_{a_i k}. See :mod:`emdpo_core.em` for the
    objective, restarts, warm starts, dropped types, checkpoints and the progress output.

    Args:
        n_components: K, the number of types (K = 1 is single DPO).
        policies: the policy family: :class:`TorchPolicies` (for
            :class:`~emdpo_core.PreferenceData`), :class:`~emdpo_core.TabularPolicies` (for
            :class:`~emdpo_core.RankingData`; the default) or any
            :class:`~emdpo_core.PolicyFamily`. Each fit trains a shallow copy of it
            (``family_``): the configuration (for torch: the template module, the frozen
            reference, the functions) is shared, the trained policies are the model's own, so
            one family object can serve several models. It is not saved: :meth:`load` needs
            it given again (``EMDPO.load(path, policies=...)``).
        Other parameters: see :class:`~emdpo_core.EMEstimator` (defaults here: max_iter=100,
            tol=1e-5).

    Fitted attributes: those of :class:`~emdpo_core.EMEstimator` (``weights_``,
    ``responsibilities_``, ``loglik_``, ``lower_bound_``, ``lower_bounds_``,
    ``converged_``, ``n_iter_``, ``timings_``, ``family_`` ...).

    Example:
        >>> import emdpo_core as ec
        >>> truth = ec.PlackettLuceMixture.from_parameters(
        ...     [[3.0, 2, 1, 0, -1, -2], [-2.0, -1, 0, 1, 2, 3]], [0.5, 0.5])
        >>> data, types = truth.sample(500, random_state=0)
        >>> model = ec.EMDPO(2, ec.TabularPolicies(), random_state=0).fit(data)
        >>> float(abs(model.predict() - types).mean().round(2)) in (0.0, 1.0)  # types found
        True
        >>> result = model.aggregate()          # MMRA over the two fitted policies
        >>> result.weights.round(1).tolist()    # mirror-image types: half each
        [0.5, 0.5]
    """

    _SKIP_PARAMS = ("policies",)

    def __init__(self, n_components: int = 1, policies: Optional[PolicyFamily] = None, *,
                 max_iter: int = 100, tol: float = 1e-5, n_init: int = 1,
                 init_params="kmeans", random_state=None, warm_start: bool = False,
                 verbose: int = 0, alpha: float = 1.0, min_weight="auto", checkpoint=None,
                 checkpoint_every: int = 10):
        super().__init__(**self._engine_args(locals()))
        self.policies = policies

    _m_step_remedy = "give the family more steps per M-step,"

    def _check_params(self):
        super()._check_params()
        if self.policies is not None and not isinstance(self.policies, PolicyFamily):
            raise TypeError(f"policies: expected a PolicyFamily (TorchPolicies, TabularPolicies, "
                            f"...) or None, got {type(self.policies).__name__}")

    def _make_family(self) -> PolicyFamily:
        # A shallow copy: the trained policies belong to this model (initialize and
        # load_state_dict assign new ones), while what the family was configured with (a
        # template module, the frozen reference, functions) is shared, not duplicated. So one
        # family object can configure several models.
        return TabularPolicies() if self.policies is None else copy.copy(self.policies)

    def _as_data(self, data):
        if self.policies is None and isinstance(data, PreferenceData):
            raise TypeError("policies: None means tabular policies, which fit RankingData; to "
                            "fit PreferenceData give a policy family, e.g. EMDPO(K, "
                            "TorchPolicies(module, ...))")
        if isinstance(data, (RankingData, PreferenceData)) or callable(getattr(data, "grouped",
                                                                               None)):
            return data
        raise TypeError(f"data: expected a PreferenceData or a RankingData, got "
                        f"{type(data).__name__}")

    def _data_warnings(self, data) -> List[str]:
        if isinstance(data, (RankingData, PreferenceData)):
            return diagnostics.identifiability(data, int(self.n_components)).warnings
        return []

    def _data_notes(self, data) -> List[str]:
        if isinstance(data, (RankingData, PreferenceData)):
            return diagnostics.identifiability(data, int(self.n_components)).notes
        return []

    def _initial_resp(self, g, K, rng):
        if K == 1 and isinstance(self.init_params, str):
            return np.ones((g.n_annotators, 1))     # single DPO: nothing to cluster
        return super()._initial_resp(g, K, rng)

    # ------------------------------------------------------------------------------------
    # Cluster-DPO

    def fit_cluster_dpo(self, data, labels=None):
        """The cluster-DPO baseline: cluster the annotators once and train one DPO policy
        per cluster on its annotators' records (hard assignments, no EM iterations).

        Args:
            data: the data.
            labels: optional (H,) cluster of each annotator in [0, K); default: the
                ``init_params`` clustering (k-means on the family's annotator features), the
                same one EM starts from.

        Sets the fitted attributes as ``fit`` does: ``responsibilities_`` are the hard
        clusters, ``weights_`` the cluster shares, ``loglik_`` the mixture log-likelihood of
        the data under the trained policies, ``n_iter_ = 0``. Empty clusters are dropped.
        Returns self.
        """
        self._check_params()
        data = self._as_data(data)
        g = data.grouped()
        K, H = int(self.n_components), g.n_annotators
        if K > H:
            raise ValueError(f"n_components={K} exceeds the number of annotators H={H}")
        self._reset_timings()
        t0 = time.perf_counter()
        self.family_ = self._make_family()
        self.family_.check_data(g, fitting=True)
        seed = self._seed()
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
        if labels is None:
            if isinstance(self.init_params, str) and self.init_params not in ("kmeans",
                                                                              "random"):
                raise ValueError(f"init_params: cluster-DPO needs a clustering ('kmeans' or "
                                 f"'random') or labels, got {self.init_params!r}")
            labels = np.argmax(self._initial_resp(g, K, rng), axis=1)
        else:
            labels = np.asarray(labels)
            if labels.shape != (H,) or labels.dtype.kind not in "iu":
                raise ValueError(f"labels: expected ({H},) integer cluster ids (one per "
                                 f"annotator), got shape {labels.shape} and dtype "
                                 f"{labels.dtype}")
            bad = np.flatnonzero((labels < 0) | (labels >= K))
            if bad.size:
                raise ValueError(f"labels: expected ids in [0, {K}), got {labels[bad[0]]} at "
                                 f"index {bad[0]}")
        used = np.unique(labels)
        labels = np.searchsorted(used, labels)
        resp = np.zeros((H, used.size))
        resp[np.arange(H), labels] = 1.0
        self.family_.initialize(g, self._record_weights(g, resp), rng)
        eta = _mixture.mixture_weights(resp, g.annotator_weight, float(self.alpha))
        log_weights = np.log(np.maximum(eta, 1e-300))
        self.timings_["init"] += time.perf_counter() - t0
        loglik = self._e_step(g, log_weights)[1]
        obj = self._objective(loglik, log_weights)
        run = _Run(restart=0, n_iter=0, log_weights=log_weights, resp=resp, loglik=loglik,
                   objective=obj, trace=[obj / g.total_weight], converged=True,
                   components=used)
        summary = {"restart": 0, "objective": obj, "loglik": loglik, "n_iter": 0,
                   "converged": True, "n_components": int(used.size)}
        self._set_fitted({"run": run, "family": self.family_.state_dict()}, [summary], g)
        self._on_fitted(data)
        return self

    # ------------------------------------------------------------------------------------
    # MMRA

    def aggregate(self, contexts=None, *, n_samples: int = 1, kind: str = "reward",
                  group_weights=None, solver=None, random_state=None) -> AggregationResult:
        """MinMax Regret Aggregation of the fitted policies into one mixture.

        Samples ``n_samples`` responses per context from every fitted policy, caches every
        policy's (and the reference's) log-probabilities of them, builds the regret matrix
        (:func:`emdpo_core.regret_matrix`, ``kind`` "kl" or "reward") and solves the MMRA LP
        (:func:`emdpo_core.mmra`, needs cvxpy unless ``solver="hedge"``). Serve the result
        with ``emdpo_core.MixturePolicy(result.weights, generate_functions)``.

        Args:
            contexts: what the family samples for: for :class:`TorchPolicies` a dict of
                per-context inputs (e.g. ``{"prompt": prompt_ids}``) passed to its
                ``sample_fn``; for :class:`~emdpo_core.TabularPolicies` None (all items) or a
                list of candidate sets (enumerated exactly, no sampling).
            n_samples: samples per context and policy.
            kind: the regret R[k, j] of type k served by policy j (see
                :func:`emdpo_core.regret_matrix` and docs/math.md):

                - "reward" (default; the authors' criterion): beta (A_kk - A_kj), the
                  implicit reward r_k = beta (log pi_k - log pi_ref) that type k loses when
                  policy j answers instead of its own, with A_kj the mean of log pi_k -
                  log pi_ref over policy j's samples. It judges answers by the types'
                  rewards alone; it needs the reference's log-probabilities and can be
                  negative.
                - "kl": beta E_{y ~ pi_j}[log pi_j(y) - log pi_k(y)], the exact loss in type
                  k's KL-regularized value E[r_k] - beta KL(pi || pi_ref), the objective DPO
                  maximizes; always >= 0. The right choice when staying close to the
                  reference is part of what each type values (the KL term is the price DPO
                  charges for leaving it), or when the reference's log-probabilities of the
                  samples are not available. The two kinds can give very different weights.
            group_weights: optional (K,) per-type weights c of the LP.
            solver: passed to :func:`emdpo_core.mmra`.
            random_state: seed of the sampling.
        """
        from ..mmra import mmra, regret_matrix

        self._check_fitted()
        n_samples = _checks.check_int("n_samples", n_samples, 1)
        if kind not in ("kl", "reward"):
            raise ValueError(f"kind: expected 'kl' or 'reward', got {kind!r}")
        s = self.family_.policy_samples(contexts, n_samples, np.random.default_rng(random_state))
        if kind == "reward" and s.ref is None:
            raise ValueError("kind='reward' needs the reference policy's log-probabilities of "
                             "the samples; give the family a reference (TorchPolicies("
                             "reference=...)) or use kind='kl'")
        R = regret_matrix(s.logps, s.ref if kind == "reward" else None, s.source_offsets,
                          beta=s.beta, kind=kind, sample_weights=s.weights)
        if not isinstance(R, np.ndarray):
            R = R.detach().cpu().numpy()
        res = mmra(R, group_weights=group_weights, solver=solver)
        return AggregationResult(weights=res.weights, max_regret=res.max_regret,
                                 regrets=res.regrets, regret_matrix=R, kind=kind,
                                 status=res.status)
