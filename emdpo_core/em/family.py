"""The policy-family protocol of the EM engine: a family owns the K type policies, their
log-probabilities and their M-step; the engine owns everything else. Also the engine's
warnings."""

from __future__ import annotations

import abc
from typing import Any, Dict, NamedTuple

import numpy as np

from ..distributed import LocalComm

__all__ = ["ConvergenceWarning", "CollapsedComponentWarning", "PolicyLogps", "PolicyFamily",
           "PolicySamples"]


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

    Distributed fits (``fit(..., process_group=...)``): each rank's family sees only that
    rank's records, so every sum over records in ``initialize`` and ``m_step`` must be summed
    over the ranks with ``self.comm`` (a :class:`~emdpo_core.distributed.LocalComm` that does
    nothing in one process; the engine sets the fit's communicator), e.g.
    ``self.comm.sum(local_gradient)``, so that every rank gets the same result. A family that
    does this sets ``supports_process_group = True``; the engine refuses the others on a
    group.

    ``data`` is the grouped data: what the user's data object's ``grouped()`` returns, a
    :class:`~emdpo_core.data.GroupedRecords` subclass (records sorted by annotator; e.g.
    :class:`~emdpo_core.data.GroupedRankings` for tabular rankings). Every per-record or
    per-slot array the family makes must follow that order. ``weights`` is a (K, N) float64 array,
    w[k, i] = c_i v_{a_i} g_{a_i k}: record i's weight for type k (its count times its
    annotator's count times the annotator's posterior).

    A family whose ``logps`` are torch tensors and whose ``initialize`` / ``m_step`` take
    ``weights`` as a float64 torch tensor on that device sets ``tensor_weights = True``: the
    engine then keeps the E-step's posteriors on the device and builds the weights there, so
    only K-sized values go to the host per iteration. Otherwise ``weights`` is NumPy.
    """

    supports_process_group = False
    tensor_weights = False
    comm = LocalComm()       # the engine sets the fit's communicator on the instance

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
