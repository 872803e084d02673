"""diagnostics.identifiability: the degrees-of-freedom count, the distributions it reports,
and the warnings (pairs only, few items, too few degrees of freedom)."""

import itertools
import math

import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core import RankingData
from emdpo_core.diagnostics import DOF_CAP, degrees_of_freedom, identifiability


def _top1(choices, candidate_sets):
    return RankingData.from_rankings([[c] for c in choices], candidate_sets)


def test_best_of_a_fixed_triple_has_two_degrees_of_freedom():
    d = _top1([0, 1, 2] * 10, [[0, 1, 2]] * 30)
    rep = identifiability(d, 2)
    assert rep.degrees_of_freedom == 2 and rep.n_parameters == 5
    assert any("2 degrees of freedom" in w for w in rep.warnings) and not rep.ok
    assert rep.depths == {1: 30.0} and rep.list_lengths == {3: 30.0}


def test_full_rankings_of_the_triple_have_five():
    d = RankingData.from_rankings([list(p) for p in itertools.permutations(range(3))])
    rep = identifiability(d, 2)
    assert rep.degrees_of_freedom == 5
    assert not any("degrees of freedom" in w for w in rep.warnings)
    # but 3 items <= 2k - 1 = 3: Zhao, Piech, Xia
    assert any("Zhao" in w for w in rep.warnings)


def test_varying_candidate_sets_add_up():
    sets = [list(c) for c in itertools.combinations(range(6), 3)]     # 20 triples
    d = _top1([s[0] for s in sets], sets)
    rep = identifiability(d, 2)
    assert rep.degrees_of_freedom == 20 * (3 - 1)
    assert rep.n_parameters == 2 * 5 + 1 and rep.ok


def test_the_deepest_observed_depth_of_a_candidate_set_counts():
    # {0,1,2,3} seen to depth 1 and depth 2, in different orders: 4*3 - 1 = 11, not 11 + 3.
    d = RankingData.from_rankings([[0], [2, 1], [3]], [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]])
    assert degrees_of_freedom(d) == 4 * 3 - 1


def test_the_count_is_capped():
    d = RankingData.from_rankings([list(range(40))])
    assert degrees_of_freedom(d) == DOF_CAP
    assert DOF_CAP < math.factorial(40)


def test_pairs_only_warns_with_the_reference():
    pairs = RankingData.from_rankings([[0, 1], [2, 3], [4, 5], [1, 3], [5, 0]] * 20)
    rep = identifiability(pairs, 2)
    assert rep.pair_share == 1.0
    msg = [w for w in rep.warnings if "binary comparisons" in w]
    assert msg and "2510.15716" in msg[0] and "each annotator gives one comparison" in msg[0]
    assert identifiability(pairs, 1).ok          # one type is always identifiable here


def test_reported_distributions_are_weighted():
    d = RankingData.from_rankings([[0, 1], [0, 1, 2], [2, 0]], [None, None, [0, 1, 2]],
                                  annotator=["a", "a", "b"], sample_weight=[3, 1, 2])
    rep = identifiability(d, 1)
    assert rep.list_lengths == {2: 3.0, 3: 3.0}
    assert rep.depths == {1: 3.0, 2: 3.0}
    assert rep.pair_share == 0.5 and rep.n_records == 6.0 and rep.n_annotators == 2.0
    assert rep.records_per_annotator == {"min": 1.0, "median": 1.5, "mean": 1.5, "max": 2.0}
    assert rep.n_items == 3
    assert set(rep.to_dict()) >= {"degrees_of_freedom", "warnings", "pair_share"}


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_n_types(k):
    d = RankingData.from_rankings([[0, 1, 2]])
    with pytest.raises(ValueError, match="n_types: expected an int >= 1"):
        identifiability(d, k)


def test_module_is_exported():
    assert ec.diagnostics.identifiability is identifiability
    assert issubclass(ec.IdentifiabilityWarning, UserWarning)
    rng = np.random.default_rng(0)
    d = RankingData.from_rankings([rng.permutation(7).tolist() for _ in range(50)])
    assert identifiability(d, 3).ok     # 7 items > 2*3 - 1, full rankings: 7! - 1 >> 20


@pytest.mark.parametrize("module", ["emdpo_core.data.rankings", "emdpo_core.data.preferences",
                                    "emdpo_core.data._grouping", "emdpo_core.diagnostics",
                                    "emdpo_core.em.tabular", "emdpo_core.em.selection"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
