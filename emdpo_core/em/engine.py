"""The EM engine over latent annotator types, and its exact tabular form.

EM-DPO (docs/math.md): annotators h = 0..H-1 belong to K latent types with weights eta;
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
import math
import sys
import time
import warnings
from typing import List, Optional

import numpy as np

from . import _initialization, _mixture, _responsibilities
from .. import _checks
from ..diagnostics import IdentifiabilityWarning
from .._checks import to_numpy
from ..distributed import LocalComm, check_same
from ..ops.listwise import e_step
from ._initialization import INIT_PARAMS, INIT_SMOOTHING  # noqa: F401  (emdpo_core.em)
from ._scoring import Scoring
from ._shards import EMShards
from .family import CollapsedComponentWarning, ConvergenceWarning, PolicyFamily
from .persistence import Persistence, _Run

__all__ = ["EMEstimator"]

class EMEstimator(Persistence, Scoring, abc.ABC):
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
            uninterrupted run. Files never store this path (a file must not decide where a
            later call writes): to keep checkpointing after a resume, say so again,
            ``load(path, checkpoint=path)``.
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

    def _data_notes(self, data) -> List[str]:
        """What limits identification without ruling it out; printed (stderr) at the start of
        fit when verbose >= 1."""
        return []

    def _on_fitted(self, data) -> None:
        """Subclass hook: set extra fitted attributes from the data."""

    # ------------------------------------------------------------------------------------
    # Parameters (scikit-learn conventions)

    @staticmethod
    def _engine_args(values: dict) -> dict:
        """The engine's parameters picked from a subclass ``__init__``'s ``locals()``, for
        ``super().__init__(**...)``: subclasses list them in their own signatures (with their
        own defaults, as scikit-learn requires) and pass them on in one place."""
        return {p: values[p] for p in inspect.signature(EMEstimator.__init__).parameters
                if p != "self"}

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
        _checks.check_int("n_components", self.n_components, 1)
        _checks.check_int("max_iter", self.max_iter, 1)
        _checks.check_float("tol", self.tol, 0.0)
        _checks.check_int("n_init", self.n_init, 1)
        _checks.check_int("verbose", self.verbose, 0)
        alpha = _checks.check_float("alpha", self.alpha, 1.0)
        K = int(self.n_components)
        # The log prior (alpha - 1) sum_k log eta_k must stay finite: with eta_k near 1/K it is
        # about -(alpha - 1) K log K (a margin of 4 covers weights away from uniform).
        if (alpha - 1.0) * 4.0 * K * (math.log(K) + 1.0) > np.finfo(np.float64).max:
            raise ValueError(f"alpha: {alpha!r} is too large for K={K}: the Dirichlet log prior "
                             f"(alpha - 1) * sum_k log eta_k overflows float64; any alpha above "
                             f"about 1e6 already pins the weights at 1/K")
        _checks.check_int("checkpoint_every", self.checkpoint_every, 1)
        if not (isinstance(self.min_weight, str) and self.min_weight == "auto"):
            w = _checks.check_float("min_weight", self.min_weight, 0.0)
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
            return 0.5 / self._shards.annotator_total(g)
        return float(self.min_weight)

    def _arrays(self, g) -> _responsibilities.GroupedArrays:
        """g's arrays where the policies are; kept for the data of the fit in progress."""
        arrays = self.__dict__.get("_arrays_of")
        if arrays is None or arrays.grouped is not g:
            arrays = _responsibilities.GroupedArrays(g)
            if "_shards" in self.__dict__:      # fitting (fit's finally lets it go)
                self._arrays_of = arrays
        return arrays

    def _record_weights(self, g, resp):
        """(K, N) M-step weights w_ki = c_i v_{a_i} g_{a_i k}, where resp is (NumPy on the
        host, or a tensor on the policies' device; see _responsibilities)."""
        if not getattr(self.family_, "tensor_weights", False):
            resp = to_numpy(resp)           # the family takes NumPy weights: built on the host
        return self._arrays(g).record_weights(resp)

    def _reset_timings(self):
        self.timings_ = dict.fromkeys(
            ("init", "logps", "e_step", "m_step", "bookkeeping", "checkpoint"), 0.0)

    def _check_fitted(self):
        if getattr(self, "family_", None) is None or not hasattr(self, "weights_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit first")

    # ------------------------------------------------------------------------------------
    # EM steps

    def _e_step(self, g, log_weights, *, per_annotator=False):
        """(responsibilities (H, K), loglik, type totals (K,)): the kernel's weighted
        log-likelihood sum_h v_h logsumexp_k (...) and sum_h v_h g_hk. With
        ``per_annotator`` also the (H,) terms logsumexp_k (log eta_k + S_hk) (NumPy).

        The responsibilities stay where the kernel returns them: NumPy for NumPy
        log-probabilities, a float64 tensor on the policies' device for torch ones; the
        log-likelihood and the K type totals are host values."""
        t0 = time.perf_counter()
        lp = self.family_.logps(g)
        t1 = time.perf_counter()
        res = e_step(lp.policy, lp.ref, log_weights=log_weights, beta=lp.beta,
                     **self._arrays(g).e_step_inputs(lp.policy))
        # Distributed fits: the partial sums of annotators on several ranks are added, the
        # log-likelihood and type totals summed over the ranks (one process: as they are).
        resp, loglik, totals, S = self._shards.combine(
            res.responsibilities, res.annotator_loglik, res.loglik, res.type_totals,
            log_weights, g.annotator_weight)
        out = (resp, loglik, totals)
        if per_annotator:
            _, per = _mixture.weighted_loglik(np.ascontiguousarray(to_numpy(S), dtype=np.float64),
                                              log_weights, g.annotator_weight)
            out += (per,)
        t2 = time.perf_counter()
        self.timings_["logps"] += t1 - t0
        self.timings_["e_step"] += t2 - t1
        return out

    def _objective(self, loglik, log_weights):
        prior = 0.0
        if self.alpha != 1.0:
            prior += (self.alpha - 1.0) * float(np.sum(log_weights))
        prior += self.family_.log_prior()
        return loglik + prior

    def _weights_and_drops(self, g, resp, components, totals=None):
        """Mixture weights from the E-step's type totals sum_h v_h g_hk (from resp when they
        are not at hand; summed over the ranks of a distributed fit); drop types below
        min_weight. Returns (eta, resp, keep) with keep None when nothing is dropped."""
        if totals is None:
            eta = self._shards.mixture_weights(resp, g.annotator_weight, float(self.alpha))
        else:
            eta = _mixture.weights_from_totals(totals, float(self.alpha))
        before = eta
        threshold = self._min_weight(g)
        low = (eta < threshold) | (eta <= 0.0)
        if not low.any() or low.all():
            return eta, resp, None
        keep = np.flatnonzero(~low)
        resp = _responsibilities.keep_types(resp, keep, eta[keep] / eta[keep].sum())
        eta = self._shards.mixture_weights(resp, g.annotator_weight, float(self.alpha))
        for k in np.flatnonzero(low):
            warnings.warn(
                f"{type(self).__name__}: type {int(components[k])} collapsed (weight "
                f"{before[k]:.3g} < min_weight={threshold:.3g}) and was dropped; "
                f"{keep.size} types remain. Use fewer n_components, alpha > 1, or "
                f"min_weight=0 to keep it", CollapsedComponentWarning, stacklevel=4)
        return eta, resp, keep

    def _initial_resp(self, g, K, rng):
        """(H_local, K) initial responsibilities (see _initialization.initial_responsibilities)."""
        return _initialization.initial_responsibilities(self.init_params, self.family_, g,
                                                        self._shards, K, rng)

    # ------------------------------------------------------------------------------------
    # Fit

    _shards = EMShards()      # one process; a fit sets its own (see fit)

    def fit(self, data, *, callback=None, process_group=None):
        """Fit the mixture by EM; returns self.

        Args:
            data: the data (for :class:`PlackettLuceMixture`: a RankingData). With a process
                group: this rank's shard; the fit is the fit of the union of the shards.
            callback: optional ``callback(info)`` called after every E-step with a dict
                (restart, iteration, objective, lower_bound, change, weights). An exception it
                raises stops the fit (after writing the checkpoint when one is set).
            process_group: a torch.distributed process group; None = the default group when
                torch.distributed is initialised with several ranks, else this process alone
                (``emdpo_core.distributed.LocalComm()``: this process alone in any case). Every
                rank of the group calls ``fit`` with its own records. Every rank ends with the
                same weights, policies, log-likelihood, trace and convergence;
                ``responsibilities_`` holds this rank's annotators (row h: annotator h of its
                data). Checkpoints are written by rank 0 and read by every rank; they hold no
                responsibilities (an E-step recomputes them on resume). See
                :mod:`emdpo_core.distributed` and docs/distributed.md.
        """
        self._check_params()
        data = self._as_data(data)
        g = data.grouped()
        shards = EMShards.for_data(data, g, process_group)
        self._shards = shards
        try:
            return self._fit(data, g, shards, callback)
        finally:
            del self._shards           # back to the class's one-process default
            self.__dict__.pop("_arrays_of", None)   # holds the data and its device copies
            if getattr(self, "family_", None) is not None:
                self.family_.comm = LocalComm()

    def _fit(self, data, g, shards, callback):
        check_same(shards.comm, "n_components", int(self.n_components), "n_components")
        H = shards.n_annotators(g)
        if self.n_components > H and self._pending is None and not \
                (self.warm_start and getattr(self, "family_", None) is not None):
            raise ValueError(f"n_components={self.n_components} exceeds the number of annotators "
                             f"H={H}")
        for msg in self._data_warnings(data):
            warnings.warn(msg, IdentifiabilityWarning, stacklevel=3)
        if self.verbose >= 1:
            for msg in self._data_notes(data):
                print(f"note: {msg}", file=sys.stderr)
        self._reset_timings()
        total_weight = shards.total_weight(g)
        self._fingerprint = shards.fingerprint(g)
        pending, self._pending = self._pending, None
        warm = (pending is None and self.warm_start and
                getattr(self, "family_", None) is not None and hasattr(self, "weights_"))
        if shards.distributed and not self._family_supports_groups():
            raise TypeError(f"process_group: {type(self._make_family()).__name__} does not "
                            f"support distributed fits (its M-step would see only this rank's "
                            f"records); see PolicyFamily.supports_process_group")
        if pending is not None:
            if pending["fingerprint"] != self._fingerprint:
                raise ValueError("fit: the checkpoint was written for different data (the "
                                 "fingerprints of the grouped records differ"
                                 f"{', or another number of ranks' if shards.distributed else ''})")
            seed, best, run = pending["seed"], pending["best"], pending["run"]
            n_runs, first = pending["n_runs"], pending["next_restart"]
            summaries = list(pending["summaries"])
            self.family_.comm = shards.comm
            if pending["run_family"] is not None:
                self.family_.load_state_dict(pending["run_family"])
            if run is not None and run.resp.shape[0] != g.n_annotators:
                # Checkpoints of distributed fits hold no responsibilities: the E-step of the
                # saved policies and weights gives them again, bit for bit.
                run.resp, _, run.totals = self._e_step(g, run.log_weights)
        else:
            if not warm:
                self.family_ = self._make_family()
            seed = shards.broadcast_seed(self._seed())
            best, run, first, summaries = None, None, 0, []
            n_runs = 1 if warm else int(self.n_init)
        self.family_.comm = shards.comm
        self.family_.check_data(g, fitting=True)
        self._fit_seed = seed
        bar = None
        if self.verbose >= 1 and shards.is_writer:
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
        if not self.converged_ and shards.is_writer:
            warnings.warn(
                f"{type(self).__name__}: the best of {n_runs} run(s) did not converge in "
                f"max_iter={self.max_iter} iterations (last change of the objective per record "
                f"{self._last_change(best['run']):.3g} >= tol={self.tol:g}). Remedies: increase "
                f"max_iter, loosen tol, {self._m_step_remedy} or continue from this fit with "
                f"warm_start=True", ConvergenceWarning, stacklevel=3)
        if self.checkpoint is not None:
            t0 = time.perf_counter()
            if shards.is_writer:
                meta, arrays = self._fitted_state()
                if shards.distributed:       # this rank's rows only: not saved
                    arrays.pop("responsibilities", None)
                self._write(self.checkpoint, "fitted", {"fitted": meta}, arrays)
            self.timings_["checkpoint"] += time.perf_counter() - t0
        return self

    def _family_supports_groups(self) -> bool:
        fam = getattr(self, "family_", None)
        if fam is None or self._pending is not None:
            fam = self._make_family()
        return bool(getattr(fam, "supports_process_group", False))

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
        self.family_.initialize(g, self._record_weights(g, resp), rng)
        log_weights = np.log(eta)
        resp, loglik, totals = self._e_step(g, log_weights)
        obj = self._objective(loglik, log_weights)
        return _Run(restart=r, n_iter=0, log_weights=log_weights, resp=resp, loglik=loglik,
                    objective=obj, trace=[obj / total_weight], components=components,
                    dropped=dropped, totals=totals)

    def _warm_run(self, g, total_weight) -> _Run:
        log_weights = np.log(self.weights_)
        resp, loglik, totals = self._e_step(g, log_weights)
        obj = self._objective(loglik, log_weights)
        return _Run(restart=0, n_iter=0, log_weights=log_weights, resp=resp, loglik=loglik,
                    objective=obj, trace=[obj / total_weight],
                    components=np.arange(log_weights.shape[0]), totals=totals)

    def _iterate(self, g, run, total_weight, best, summaries, n_runs, callback, bar) -> _Run:
        fam = self.family_
        if bar is not None and run.n_iter:
            bar.update(run.n_iter)
        # The state of the last completed iteration, written if the fit is interrupted.
        self._snapshot = (run, fam.state_dict()) if self.checkpoint is not None else None
        while run.n_iter < self.max_iter and not run.converged:
            t0 = time.perf_counter()
            eta, resp, keep = self._weights_and_drops(g, run.resp, run.components, run.totals)
            W = self._record_weights(g, resp)
            t1 = time.perf_counter()
            if keep is not None:
                fam.keep_components(keep)
            fam.m_step(g, W)
            t2 = time.perf_counter()
            log_weights = np.log(eta)
            new_resp, loglik, totals = self._e_step(g, log_weights)
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
                       components=components, dropped=dropped, totals=totals)
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
        if run.resp.shape[0] != g.n_annotators:   # resumed from a distributed checkpoint
            run.resp = self._e_step(g, run.log_weights)[0]
        self.weights_ = np.exp(run.log_weights)
        self.responsibilities_ = to_numpy(run.resp)    # the one (H, K) copy to the host
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
        self._n_annotators_fit = float(self._shards.annotator_total(g))
