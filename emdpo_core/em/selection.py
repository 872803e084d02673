"""Choosing the number of types K by BIC or AIC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from .. import _checks
from .tabular import PlackettLuceMixture

__all__ = ["ModelSelection", "select_n_components"]


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
                        estimator=PlackettLuceMixture, process_group=None,
                        **params) -> ModelSelection:
    """Fit one model per K in ``n_components_range`` and compare them by BIC or AIC.

    Args:
        data: the data (RankingData for the default estimator).
        n_components_range: iterable of K >= 1.
        criterion: "bic" (default) or "aic"; lower is better.
        estimator: the estimator class (default PlackettLuceMixture).
        process_group: passed to every ``fit`` (each rank passes its shard as ``data``; the
            criteria are those of the union, so every rank picks the same K).
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
    ks = [_checks.check_int("n_components_range", k, 1) for k in n_components_range]
    if not ks:
        raise ValueError("n_components_range: expected at least one K, got none")
    rows, models = [], {}
    for k in ks:
        model = estimator(k, **params).fit(data, process_group=process_group)
        models[k] = model
        rows.append({"n_components": k, "n_components_fitted": model.n_components_,
                     "loglik": model.loglik_, "n_parameters": model.n_parameters(),
                     "bic": model.bic(), "aic": model.aic(), "converged": model.converged_,
                     "n_iter": model.n_iter_})
    best = min(rows, key=lambda r: (r[criterion], r["n_components"]))
    return ModelSelection(rows=rows, criterion=criterion,
                          best_n_components=best["n_components"],
                          best_model=models[best["n_components"]], models=models)
