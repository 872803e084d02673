"""RankingData: layout, grouping, weights, loaders (PrefLib, JSONL) and every validation error."""

import json

import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core import RankingData

# The fast subset run against an installed wheel (`pytest -m smoke`, .ci/wheel_smoke.sh).
pytestmark = pytest.mark.smoke


# ----------------------------------------------------------------------------------------
# Layout


def test_from_rankings_layout_full_and_top_k():
    d = RankingData.from_rankings([[2, 0, 1], [1, 3], [0]], [None, None, [3, 0, 1, 2]])
    assert d.n_records == 3 and d.n_items == 4
    assert d.offsets.tolist() == [0, 3, 5, 9]
    assert d.items.tolist() == [2, 0, 1, 1, 3, 0, 3, 1, 2]
    assert d.n_ranked.tolist() == [2, 1, 1]
    assert d.record(2) == ([0], [3, 1, 2])
    assert d.annotator is None and d.n_annotators == 3


def test_listing_all_or_all_but_one_candidate_is_a_full_ranking():
    d = RankingData.from_rankings([[0, 1, 2], [0, 1]], [[0, 1, 2], [2, 1, 0]])
    assert d.n_ranked.tolist() == [2, 2]
    assert d.record(1) == ([0, 1], [2])


def test_names_map_to_ids_in_order_of_first_appearance():
    d = RankingData.from_rankings([["b", "a"], ["c", "a", "b"]])
    assert d.item_names == ["b", "a", "c"]
    assert d.items.tolist() == [0, 1, 2, 1, 0]
    fixed = RankingData.from_rankings([["b", "a"]], item_names=["a", "b", "c"])
    assert fixed.items.tolist() == [1, 0] and fixed.n_items == 3


def test_grouping_is_stable_by_annotator_and_kept():
    d = RankingData.from_rankings([[0, 1], [1, 2], [2, 0], [0, 2]],
                                  annotator=["y", "x", "y", "x"], sample_weight=[1, 2, 3, 4])
    g = d.grouped()
    assert g is d.grouped()
    assert d.annotator_labels.tolist() == ["x", "y"]
    assert g.order.tolist() == [1, 3, 0, 2]
    assert g.annotator_offsets.tolist() == [0, 2, 4]
    assert g.items.tolist() == [1, 2, 0, 2, 0, 1, 2, 0]
    # with annotators, a weight repeats the record within its annotator
    assert g.record_weight.tolist() == [2, 4, 1, 3]
    assert g.annotator_weight.tolist() == [1, 1]
    assert g.total_weight == 10 and g.annotator_total == 2


def test_without_annotators_a_weight_repeats_the_annotator():
    d = RankingData.from_rankings([[0, 1], [1, 0]], sample_weight=[3, 2])
    g = d.grouped()
    assert g.annotator_offsets.tolist() == [0, 1, 2]
    assert g.record_weight.tolist() == [1, 1]
    assert g.annotator_weight.tolist() == [3, 2]
    assert g.total_weight == 5 and g.annotator_total == 5


def test_fingerprint_changes_with_the_data():
    a = RankingData.from_rankings([[0, 1, 2]]).grouped().fingerprint()
    b = RankingData.from_rankings([[0, 2, 1]]).grouped().fingerprint()
    assert a != b and a == RankingData.from_rankings([[0, 1, 2]]).grouped().fingerprint()


# ----------------------------------------------------------------------------------------
# Constructor validation


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(items=[0, 1, 1], offsets=[0, 3]), ValueError, r"record 0 lists item 1 twice \(slots 1 and 2\)"),
    (dict(items=[0, 1, 2, 3], offsets=[0, 2, 4], n_items=3), ValueError,
     r"id 3 at slot 3 \(record 1\) is out of range for n_items=3"),
    (dict(items=[0, -1], offsets=[0, 2]), ValueError, r"ids >= 0, got -1 at slot 1 \(record 0\)"),
    (dict(items=[0, 1], offsets=[0, 2, 2]), ValueError,
     r"at least 2 responses.*record 1 spans offsets\[1\]=2 to offsets\[2\]=2"),
    (dict(items=[0, 1, 2], offsets=[0, 2, 3]), ValueError,
     r"at least 2 responses.*record 1 spans offsets\[1\]=2 to offsets\[2\]=3"),
    (dict(items=[0, 1], offsets=[1, 2]), ValueError, r"offsets\[0\] == 0, got 1"),
    (dict(items=[0, 1, 2], offsets=[0, 2]), ValueError, r"offsets\[-1\] == len\(items\) == 3"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 3, 2, 4]), ValueError, r"non-decreasing"),
    (dict(items=[0, 1], offsets=[0]), ValueError, r"at least one record"),
    (dict(items=[0.5, 1], offsets=[0, 2]), TypeError, r"items: expected an integer array"),
    (dict(items=[[0, 1]], offsets=[0, 2]), ValueError, r"items: expected a 1-D"),
    (dict(items=[0, 1, 2], offsets=[0, 3], n_ranked=[3]), ValueError,
     r"record 0 has m=3 candidates and n_ranked=3; expected 1 <= n_ranked <= m - 1 = 2"),
    (dict(items=[0, 1, 2], offsets=[0, 3], n_ranked=[0]), ValueError, r"n_ranked=0"),
    (dict(items=[0, 1, 2], offsets=[0, 3], n_ranked=[1, 1]), ValueError, r"n_ranked: expected 1"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 2, 4], annotator=[0]), ValueError,
     r"annotator: expected shape \(2,\)"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 2, 4], annotator=[0.5, 1]), TypeError,
     r"annotator: expected integer or string ids"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 2, 4], sample_weight=[1, -1]), ValueError,
     r"sample_weight: expected finite values >= 0, got -1.0 at index 1"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 2, 4], sample_weight=[1, np.nan]), ValueError,
     r"got nan at index 1"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 2, 4], sample_weight=[0, 0]), ValueError, r"every weight is 0"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 2, 4], sample_weight=[1]), ValueError, r"shape \(2,\)"),
    (dict(items=[0, 1, 2, 0], offsets=[0, 2, 4], sample_weight=["a", "b"]), TypeError, r"real numbers"),
    (dict(items=[0, 1], offsets=[0, 2], n_items=1), ValueError, r"n_items: expected an int >= 2"),
    (dict(items=[0, 1], offsets=[0, 2], n_items=2.0), TypeError, r"n_items: expected an int"),
    (dict(items=[0, 1], offsets=[0, 2], item_names=["a"]), ValueError, r"item_names: expected 2"),
])
def test_constructor_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        RankingData(**kwargs)


@pytest.mark.parametrize("rankings, candidates, kwargs, err, match", [
    ([[0, 1], []], None, {}, ValueError, r"rankings\[1\]: empty ranking"),
    ([[0, 1], [2]], None, {}, ValueError, r"rankings\[1\]: a ranking of one item \(2\) with no other"),
    ([[0, 1, 0]], None, {}, ValueError, r"rankings\[0\]: item 0 appears twice"),
    ([[0, 5]], [[0, 1, 2]], {}, ValueError, r"ranked item 5 is not in the candidate set"),
    ([[0]], [[0, 1, 1]], {}, ValueError, r"candidate 1 appears twice"),
    ([[0]], [[0]], {}, ValueError, r"candidate set has 1 item"),
    ([[0, "a"]], None, {}, TypeError, r"is a name but earlier items are integer ids"),
    ([["a", 1]], None, {}, TypeError, r"is an integer but earlier items are names"),
    ([[True, 1]], None, {}, TypeError, r"is a boolean"),
    ([[0, -2]], None, {}, ValueError, r"item id -2 is negative"),
    ([[0, 4]], None, {"n_items": 3}, ValueError, r"item id 4 is out of range for n_items=3"),
    ([["a", "z"]], None, {"item_names": ["a", "b"]}, ValueError, r"'z' is not in item_names"),
    ([[0.5, 1]], None, {}, TypeError, r"has type float"),
    ([], None, {}, ValueError, r"at least one ranking"),
    ([[0, 1]], [[0, 1], [1, 0]], {}, ValueError, r"candidates: expected 1 candidate sets"),
    ("ab", None, {}, TypeError, r"rankings\[0\]: expected a list of items"),
])
def test_from_rankings_errors(rankings, candidates, kwargs, err, match):
    with pytest.raises(err, match=match):
        RankingData.from_rankings(rankings, candidates, **kwargs)


def test_huge_sparse_ids_need_no_array_of_size_n_items():
    d = RankingData([10 ** 12, 5, 5, 10 ** 12], [0, 2, 4])
    assert d.n_items == 10 ** 12 + 1
    with pytest.raises(ValueError, match=r"record 0 lists item 1000000000000 twice"):
        RankingData([10 ** 12, 10 ** 12], [0, 2])
    assert ec.diagnostics.degrees_of_freedom(d) == 1   # one candidate set {5, 10**12}, depth 1


# ----------------------------------------------------------------------------------------
# PrefLib


SOC_NEW = """# FILE NAME: 00001-00000001.soc
# TITLE: test election
# DATA TYPE: soc
# NUMBER ALTERNATIVES: 3
# NUMBER VOTERS: 6
# NUMBER UNIQUE ORDERS: 3
# ALTERNATIVE NAME 1: Alice
# ALTERNATIVE NAME 2: Bob
# ALTERNATIVE NAME 3: Carol
3: 1,2,3
2: 3,1,2
1: 2,3,1
"""


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_preflib_soc_new_format(tmp_path):
    d = RankingData.from_preflib(_write(tmp_path, "a.soc", SOC_NEW))
    assert d.item_names == ["Alice", "Bob", "Carol"]
    assert d.items.tolist() == [0, 1, 2, 2, 0, 1, 1, 2, 0]
    assert d.n_ranked.tolist() == [2, 2, 2]
    assert d.sample_weight.tolist() == [3, 2, 1]
    assert d.annotator is None and d.grouped().annotator_total == 6


def test_preflib_soi_top_k_of_all_alternatives(tmp_path):
    text = """# DATA TYPE: soi
# NUMBER ALTERNATIVES: 5
4: 3,1
2: 5
1: 2,4,1,3
1: 1,2,3,4,5
"""
    d = RankingData.from_preflib(_write(tmp_path, "b.soi", text))
    assert np.diff(d.offsets).tolist() == [5, 5, 5, 5]
    assert d.n_ranked.tolist() == [2, 1, 4, 4]
    assert d.record(0) == ([2, 0], [1, 3, 4])        # the unlisted are the unranked rest
    assert d.record(1) == ([4], [0, 1, 2, 3])
    assert d.record(2) == ([1, 3, 0, 2], [4])         # n - 1 listed: a full ranking
    assert d.sample_weight.tolist() == [4, 2, 1, 1]


def test_preflib_old_format(tmp_path):
    text = "3\n1,Alice\n2,Bob\n3,Carol\n6,6,3\n3,1,2,3\n2,3,1,2\n1,2,3,1\n"
    d = RankingData.from_preflib(_write(tmp_path, "c.soc", text))
    new = RankingData.from_preflib(_write(tmp_path, "a.soc", SOC_NEW))
    assert d.items.tolist() == new.items.tolist()
    assert d.item_names == new.item_names
    assert d.sample_weight.tolist() == new.sample_weight.tolist()


def test_preflib_toc_without_ties_and_singleton_groups(tmp_path):
    text = "# NUMBER ALTERNATIVES: 3\n2: 1,{2},3\n1: 3,2\n"
    d = RankingData.from_preflib(_write(tmp_path, "d.toc", text))
    assert d.items.tolist() == [0, 1, 2, 2, 1, 0]
    assert d.n_ranked.tolist() == [2, 2]


def test_preflib_ties_are_rejected_with_the_line(tmp_path):
    p = _write(tmp_path, "e.toc", "# NUMBER ALTERNATIVES: 4\n1: 1,2,3,4\n1: 1,{2,3},4\n")
    with pytest.raises(ValueError, match=r"e.toc:3: tie \{2,3\}: the Plackett-Luce model has no ties"):
        RankingData.from_preflib(p)


def test_preflib_trailing_tie_as_unranked_rest(tmp_path):
    text = "# NUMBER ALTERNATIVES: 4\n1: 2,{1,3,4}\n"
    p = _write(tmp_path, "f.toc", text)
    with pytest.raises(ValueError, match="trailing_tie='unranked'"):
        RankingData.from_preflib(p)
    d = RankingData.from_preflib(p, trailing_tie="unranked")
    assert d.record(0) == ([1], [0, 2, 3])


@pytest.mark.parametrize("name, text, match", [
    ("g.soc", "# NUMBER ALTERNATIVES: 3\n1: 1,2\n", r"g.soc:2: a .soc order must list all 3"),
    ("h.soi", "# NUMBER ALTERNATIVES: 3\n1: 1,4\n", r"h.soi:2: alternative 4 is out of range 1..3"),
    ("i.soi", "# NUMBER ALTERNATIVES: 3\n1: 1,2,1\n", r"i.soi:2: alternative 1 appears twice"),
    ("j.soi", "# NUMBER ALTERNATIVES: 3\nx: 1,2\n", r"j.soi:2: the count 'x' is not an integer"),
    ("k.soi", "# NUMBER ALTERNATIVES: 3\n1: 1,b\n", r"k.soi:2: 'b' is not an alternative number"),
    ("l.soi", "# TITLE: t\n1: 1,2\n", r"no '# NUMBER ALTERNATIVES: n' header"),
    ("m.soi", "# NUMBER ALTERNATIVES: 3\n1 1,2\n", r"m.soi:2: expected 'count: a,b,c'"),
    ("n.txt", "# NUMBER ALTERNATIVES: 3\n1: 1,2\n", r"expected a PrefLib file of orders"),
    ("o.soi", "", r"the file is empty"),
    ("p.toc", "# NUMBER ALTERNATIVES: 3\n1: 1,{2,3\n", r"unbalanced"),
    ("q.soi", "# NUMBER ALTERNATIVES: 3\n0: 1,2\n", r"no orders with a positive count"),
])
def test_preflib_errors(tmp_path, name, text, match):
    with pytest.raises(ValueError, match=match):
        RankingData.from_preflib(_write(tmp_path, name, text))


def test_preflib_empty_orders_are_skipped_with_a_warning(tmp_path):
    p = _write(tmp_path, "r.soi", "# NUMBER ALTERNATIVES: 3\n2: \n1: 2\n")
    with pytest.warns(UserWarning, match="skipped 1 empty order"):
        d = RankingData.from_preflib(p)
    assert d.n_records == 1 and d.record(0) == ([1], [0, 2])


# ----------------------------------------------------------------------------------------
# JSONL


def _jsonl(tmp_path, rows, name="x.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
                 encoding="utf-8")
    return p


def test_jsonl_records(tmp_path):
    p = _jsonl(tmp_path, [
        {"annotator": "ann1", "ranking": ["x", "y"], "items": ["y", "z", "x"], "weight": 2},
        {"annotator": "ann0", "ranking": ["z", "x", "y"]},
        "",
        {"annotator": "ann1", "ranking": ["y"], "items": ["x", "y"]},
    ])
    d = RankingData.from_jsonl(p)
    assert d.item_names == ["x", "y", "z"]
    assert d.n_records == 3 and d.n_ranked.tolist() == [2, 2, 1]
    assert d.record(0) == ([0, 1], [2])
    assert d.annotator_labels.tolist() == ["ann0", "ann1"]
    assert d.annotator.tolist() == [1, 0, 1]
    assert d.sample_weight.tolist() == [2, 1, 1]


def test_jsonl_integer_items_without_annotators(tmp_path):
    d = RankingData.from_jsonl(_jsonl(tmp_path, [{"ranking": [2, 0, 1]}, {"ranking": [0, 1]}]))
    assert d.item_names is None and d.n_items == 3 and d.annotator is None
    assert d.sample_weight is None


@pytest.mark.parametrize("rows, match", [
    (["{not json"], r"x.jsonl:1: not valid JSON"),
    ([[1, 2]], r"x.jsonl:1: expected a JSON object"),
    ([{"items": [1, 2]}], r"x.jsonl:1: missing key 'ranking'"),
    ([{"ranking": [1, 2], "rank": 1}], r"unknown keys \['rank'\]"),
    ([{"ranking": "ab"}], r"'ranking' must be a list"),
    ([{"ranking": [1], "items": "ab"}], r"'items' must be a list"),
    ([{"ranking": [1, 2], "weight": -1}], r"'weight' must be a finite number >= 0"),
    ([{"ranking": [1, 2], "annotator": [1]}], r"'annotator' must be a string or an integer"),
    ([{"ranking": [1, 2], "annotator": 1}, {"ranking": [2, 1]}],
     r"x.jsonl:2: 'annotator' is given on some lines and not on others"),
    ([{"ranking": [1, 2], "annotator": 1}, {"ranking": [2, 1], "annotator": "a"}],
     r"mixes strings and integers"),
    ([{"ranking": [1, 2]}, {"ranking": [1, 1]}], r"x.jsonl:2: item 1 appears twice"),
    ([{"ranking": [3]}], r"x.jsonl:1: a ranking of one item"),
    ([], r"no records"),
])
def test_jsonl_errors(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        RankingData.from_jsonl(_jsonl(tmp_path, rows))


def test_repr_and_len():
    d = RankingData.from_rankings([[0, 1], [1, 0]], sample_weight=[1, 2])
    assert len(d) == 2 and "weighted" in repr(d) and ec.RankingData is RankingData
