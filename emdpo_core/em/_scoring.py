"""Using a fitted EM model: posteriors over the types of new data, per-annotator
log-likelihoods, and the information criteria for choosing K (a mixin of
:class:`~emdpo_core.EMEstimator`; it needs the engine's ``_e_step`` and fitted attributes)."""

from __future__ import annotations

import math

import numpy as np

from .._checks import to_numpy

__all__ = ["Scoring"]


class Scoring:
    """predict_proba / predict / score_samples / score / bic / aic of a fitted estimator."""

    def _posterior(self, data):
        """(resp (H, K), loglik, per-annotator loglik (H,), grouped data) on ``data``."""
        self._check_fitted()
        data = self._as_data(data)
        g = data.grouped()
        self.family_.check_data(g, fitting=False)
        if not hasattr(self, "timings_"):
            self._reset_timings()
        resp, loglik, _, per = self._e_step(g, np.log(self.weights_), per_annotator=True)
        return to_numpy(resp), loglik, per, g

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


