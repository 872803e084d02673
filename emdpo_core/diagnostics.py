"""Identifiability diagnostics for EM over latent annotator types.

Three checks, each a necessary condition (passing them does not prove identifiability):

1. Pairwise-only data with one comparison per annotator. A mixture of Bradley-Terry types is
   not identifiable from one binary comparison per annotator: every pair's choice probability
   is a mix of the types' and can be matched by a single type (Chidambaram, Seetharaman,
   Syrgkanis, "Direct Preference Optimization with Unobserved Preference Heterogeneity: The
   Necessity of Ternary Preferences", arXiv 2510.15716). Rankings of 3 or more responses can
   identify them from single records. With several comparisons per annotator the result does
   not apply: an annotator's comparisons share its type, and their correlation carries the
   type information (the authors fit pairs with dozens per annotator). That case gets a note
   (not a warning) with the number of records per annotator: identification then rests on
   that within-annotator correlation, and weakens as annotators give fewer comparisons.
2. Few items. A mixture of k Plackett-Luce models over m <= 2k - 1 items is not identifiable
   (Zhao, Piech, Xia, "Learning Mixtures of Plackett-Luce Models", ICML 2016).
3. Degrees of freedom (tabular data). A record with candidate set C (m = |C| items) ranked to
   depth L has m! / (m - L)! possible outcomes, so its outcome distribution has
   m!/(m-L)! - 1 free probabilities. Summed over the distinct candidate sets in the data, this
   is the number of distinct observable probabilities of one record; if it is below the
   number of parameters of a k-type mixture, k (n_items - 1) + k - 1, distinct parameters
   must give the same distribution of every record, so the types cannot be identified.
   For a candidate set seen at several depths only the deepest counts: the outcome
   distribution at a shallower depth is a marginal of the deeper one. Example: top-1 choices
   from one fixed triple give 3 - 1 = 2 degrees of freedom, too few for k = 2 types over 3
   items (2 * 2 + 1 = 5 parameters); full rankings of that triple give 3! - 1 = 5.
   The count is for one record; annotators with several records carry more information
   (their records' joint distribution), so for such data the check is conservative.

Checks 2 and 3 need item identities, so they run on :class:`~emdpo_core.RankingData` only;
for :class:`~emdpo_core.PreferenceData` (responses are model inputs) the report leaves
``n_items``, ``degrees_of_freedom`` and ``n_parameters`` as None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .data import PreferenceData, RankingData, _grouping

__all__ = ["IdentifiabilityWarning", "IdentifiabilityReport", "identifiability"]

# Outcome counts m!/(m-L)! grow fast; the count only has to be compared with the number of
# parameters, so it is capped here (reports say ">=" at the cap).
DOF_CAP = 10 ** 12


class IdentifiabilityWarning(UserWarning):
    """The data cannot identify the requested number of latent types (see
    :func:`emdpo_core.diagnostics.identifiability`)."""


@dataclass
class IdentifiabilityReport:
    """What :func:`identifiability` found. Counts are after row expansion (weighted).

    Attributes:
        n_types: the k checked.
        n_records, n_annotators: weighted numbers of records and annotators.
        n_items: number of distinct items that appear in the data (None for PreferenceData).
        pair_share: share of records that are pairs (m = 2).
        list_lengths: {m: weighted number of records with m candidates}.
        depths: {L: weighted number of records ranked to depth L}.
        records_per_annotator: {"min", "median", "mean", "max"} (unweighted counts of rows).
        degrees_of_freedom: distinct observable outcome probabilities of one record (capped at
            DOF_CAP; None for PreferenceData).
        n_parameters: k (n_items - 1) + k - 1 (None for PreferenceData).
        warnings: messages for the checks that failed.
        notes: what the checks found that limits identification without ruling it out (pairs
            with several comparisons per annotator).
    """

    n_types: int
    n_records: float
    n_annotators: float
    n_items: Optional[int]
    pair_share: float
    list_lengths: Dict[int, float]
    depths: Dict[int, float]
    records_per_annotator: Dict[str, float]
    degrees_of_freedom: Optional[int]
    n_parameters: Optional[int]
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return not self.warnings

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _outcomes(m: int, L: int) -> int:
    """m! / (m - L)!, capped at DOF_CAP."""
    n = 1
    for q in range(m - L + 1, m + 1):
        n *= q
        if n >= DOF_CAP:
            return DOF_CAP
    return n


def degrees_of_freedom(data) -> int:
    """Distinct observable outcome probabilities of one record over the candidate sets of
    ``data`` (RankingData): sum over distinct candidate sets C of |C|!/(|C|-L_C)! - 1, with L_C
    the deepest observed depth for C. Capped at DOF_CAP."""
    cache = data._cache
    if "dof" not in cache:
        used, compact = np.unique(data.items, return_inverse=True)   # ids 0..n_used-1
        words = (used.shape[0] + 63) // 64
        masks = _grouping.candidate_set_masks(compact.reshape(-1).astype(np.int64), data.offsets,
                                       words)
        uniq, inverse = np.unique(masks, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        deepest = np.zeros(uniq.shape[0], dtype=np.int64)
        np.maximum.at(deepest, inverse, data.n_ranked)
        size = np.zeros(uniq.shape[0], dtype=np.int64)
        size[inverse] = np.diff(data.offsets)
        total = 0
        for m, L in zip(size.tolist(), deepest.tolist()):
            outcomes = _outcomes(m, L)
            total += outcomes - 1
            if outcomes >= DOF_CAP or total >= DOF_CAP:
                total = DOF_CAP
                break
        cache["dof"] = int(total)
    return cache["dof"]


def identifiability(data, n_types: int) -> IdentifiabilityReport:
    """Check whether ``data`` can identify a mixture of ``n_types`` latent types.

    Args:
        data: a :class:`~emdpo_core.RankingData` or :class:`~emdpo_core.PreferenceData`
            (then only the pairwise check runs: the others need item identities).
        n_types: k >= 1.

    Returns:
        An :class:`IdentifiabilityReport` with the share of pairs, the list-length and depth
        distributions, records per annotator, the degrees-of-freedom count against the
        k (n_items - 1) + k - 1 parameters of a k-type Plackett-Luce mixture, and a warning
        message for every failed check (see the module docstring for the checks and their
        sources), and notes for what limits identification without ruling it out.
        ``PlackettLuceMixture.fit`` and ``EMDPO.fit`` emit the warnings as
        :class:`IdentifiabilityWarning`.

    Example:
        >>> import emdpo_core as ec
        >>> best_of_3 = ec.RankingData.from_rankings([[0]] * 50 + [[1]] * 30 + [[2]] * 20,
        ...                                          [[0, 1, 2]] * 100)
        >>> rep = ec.diagnostics.identifiability(best_of_3, 2)
        >>> rep.degrees_of_freedom, rep.n_parameters, rep.ok
        (2, 5, False)
    """
    if isinstance(n_types, bool) or not isinstance(n_types, (int, np.integer)) or n_types < 1:
        raise ValueError(f"n_types: expected an int >= 1, got {n_types!r}")
    if not isinstance(data, (RankingData, PreferenceData)):
        raise TypeError(f"data: expected a RankingData or a PreferenceData, got "
                        f"{type(data).__name__}")
    k = int(n_types)
    tabular = isinstance(data, RankingData)
    g = data.grouped()
    m = np.diff(g.offsets)
    w = g.record_weight * np.repeat(g.annotator_weight, np.diff(g.annotator_offsets))
    total = float(w.sum())
    n_items = int(np.unique(data.items).shape[0]) if tabular else None
    lengths = {int(v): float(w[m == v].sum()) for v in np.unique(m)}
    depths = {int(v): float(w[g.n_ranked == v].sum()) for v in np.unique(g.n_ranked)}
    per_annot = np.diff(g.annotator_offsets)
    rpa = {"min": float(per_annot.min()), "median": float(np.median(per_annot)),
           "mean": float(per_annot.mean()), "max": float(per_annot.max())}
    pair_share = lengths.get(2, 0.0) / total if total > 0 else 0.0
    dof = degrees_of_freedom(data) if tabular else None
    n_params = k * (n_items - 1) + k - 1 if tabular else None
    msgs, notes = [], []
    if k > 1 and pair_share == 1.0:
        if rpa["max"] == 1:
            msgs.append(
                f"all records are pairwise comparisons and each annotator gives one "
                f"comparison: binary comparisons cannot identify {k} latent types from one "
                f"comparison per annotator (Chidambaram et al., arXiv 2510.15716); collect rankings of 3 or "
                f"more responses, even best-of-3 choices over varying candidate sets, or "
                f"several comparisons per annotator")
        else:
            single = float(np.mean(per_annot == 1))
            notes.append(
                f"all records are pairwise comparisons, {rpa['median']:g} records per "
                f"annotator (median; min {rpa['min']:g}, max {rpa['max']:g}"
                + (f"; {single:.0%} of annotators give one" if single > 0 else "") +
                f"): one comparison per annotator cannot identify the types, so identifying "
                f"{k} types here rests on within-annotator correlation (the agreement between "
                f"each annotator's comparisons), which weakens with fewer comparisons per "
                f"annotator; rankings of 3 or more responses identify types from single "
                f"records")
    if k > 1 and tabular:
        if n_items <= 2 * k - 1:
            msgs.append(
                f"a mixture of {k} Plackett-Luce models over {n_items} items is not identifiable "
                f"(needs more than 2k - 1 = {2 * k - 1} items; Zhao, Piech, Xia, ICML 2016)")
        if dof < n_params:
            msgs.append(
                f"the data have {dof} degrees of freedom (distinct outcome probabilities over "
                f"the candidate sets and ranking depths observed) but a {k}-type mixture over "
                f"{n_items} items has {n_params} parameters; vary the candidate sets or rank "
                f"deeper")
    return IdentifiabilityReport(
        n_types=k, n_records=total, n_annotators=g.annotator_total, n_items=n_items,
        pair_share=pair_share, list_lengths=lengths, depths=depths, records_per_annotator=rpa,
        degrees_of_freedom=dof, n_parameters=n_params, warnings=msgs, notes=notes)
