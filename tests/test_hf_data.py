"""Ranked-row format of emdpo_core.hf: validation, pairwise and score converters."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from conftest import SUBPROCESS_CWD
from hf_utils import require_hf

require_hf()

from emdpo_core.hf import (NoAnnotatorWarning, from_pairwise, from_scores,  # noqa: E402
                           validate_ranked_rows)


def good_rows():
    return [
        {"prompt": "w1 w2", "responses": [" w3", " w4", " w5"], "annotator": "alice"},
        {"prompt": "w6", "responses": [" w7 w8", " w9"], "n_ranked": 1, "annotator": 7},
    ]


def test_import_emdpo_core_does_not_import_hf_stack():
    code = ("import sys, emdpo_core\n"
            "bad = [m for m in ('transformers', 'peft', 'trl', 'datasets', 'accelerate', "
            "'torch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SUBPROCESS_CWD)


def test_valid_rows_pass_and_count():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_ranked_rows(good_rows()) == 2


def test_missing_annotator_column_says_one_annotator_per_row():
    rows = [{k: v for k, v in r.items() if k != "annotator"} for r in good_rows()]
    with pytest.warns(NoAnnotatorWarning, match="each of the 2 rows is taken as its own"):
        validate_ranked_rows(rows)


@pytest.mark.parametrize("patch, message", [
    ({"responses": [" w3"]}, r"row 1: a ranking needs at least 2 responses, got 1"),
    ({"responses": [" w3", ""]}, r"row 1: response 1 is empty"),
    ({"responses": [" w3", "   "]}, r"row 1: response 1 is empty"),
    ({"responses": [" w3", " w4", " w3"]}, r"row 1: responses 0 and 2 are identical"),
    ({"n_ranked": 0}, r"row 1: n_ranked must be in \[1, 1\] for 2 responses, got 0"),
    ({"n_ranked": 2}, r"row 1: n_ranked must be in \[1, 1\] for 2 responses, got 2"),
    ({"n_ranked": 1.5}, r"row 1: n_ranked must be an integer"),
    ({"n_ranked": True}, r"row 1: n_ranked must be an integer"),
    ({"prompt": 3}, r"row 1: prompt must be a string or a non-empty list of messages"),
    ({"responses": " w3 w4"}, r"row 1: responses must be a list"),
    ({"responses": [" w3", 4]}, r"row 1: response 1 must be a string"),
    ({"annotator": None}, r"row 1: missing annotator \(other rows have one\)"),
    ({"annotator": ["not", "hashable"]}, r"row 1: annotator .* is not hashable"),
    ({"prompt": [{"role": "user"}]}, r"row 1: prompt: message 0 needs keys 'role' and"),
])
def test_bad_row_raises_naming_the_row(patch, message):
    rows = good_rows()
    rows[1].update(patch)
    with pytest.raises(ValueError, match=message):
        validate_ranked_rows(rows)


@pytest.mark.parametrize("column", ["prompt", "responses"])
def test_missing_column_is_named(column):
    rows = good_rows()
    del rows[1][column]
    with pytest.raises(ValueError, match=f"row 1: missing column '{column}'"):
        validate_ranked_rows(rows)


def test_dataset_missing_column_and_empty_input():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "w1", "answers": [" w2", " w3"]}])
    with pytest.raises(ValueError, match="missing column 'responses'"):
        validate_ranked_rows(ds)
    with pytest.raises(ValueError, match="no rows"):
        validate_ranked_rows([])


def test_conversational_rows_and_message_responses():
    rows = [{"prompt": [{"role": "user", "content": "w1 w2"}],
             "responses": [" w3", [{"role": "assistant", "content": "w4"}]], "annotator": 0}]
    assert validate_ranked_rows(rows) == 1
    rows[0]["responses"][1] = [{"role": "assistant", "content": " "}]
    with pytest.raises(ValueError, match="row 0: response 1 is empty"):
        validate_ranked_rows(rows)
    # The same text as a string and as a message is the same response to the chat template,
    # but they are compared as written; two equal message lists are duplicates.
    rows[0]["responses"] = [[{"role": "assistant", "content": "w4"}]] * 2
    with pytest.raises(ValueError, match="responses 0 and 1 are identical"):
        validate_ranked_rows(rows)


def test_from_pairwise_list_and_dataset():
    pairs = [{"prompt": "w1", "chosen": " w2", "rejected": " w3", "user": "u1", "weight": 0.5},
             {"prompt": "w4", "chosen": " w5", "rejected": " w6", "user": "u2", "weight": 2.0}]
    ranked = from_pairwise(pairs, annotator_column="user")
    assert ranked[0] == {"weight": 0.5, "annotator": "u1", "prompt": "w1",
                         "responses": [" w2", " w3"], "n_ranked": 1}
    assert validate_ranked_rows(ranked) == 2
    datasets = pytest.importorskip("datasets")
    ds = from_pairwise(datasets.Dataset.from_list(pairs), annotator_column="user")
    assert isinstance(ds, datasets.Dataset)
    assert sorted(ds.column_names) == ["annotator", "n_ranked", "prompt", "responses", "weight"]
    assert ds[1]["responses"] == [" w5", " w6"] and ds[1]["annotator"] == "u2"
    with pytest.raises(ValueError, match="annotator_column 'who' is not a column"):
        from_pairwise(datasets.Dataset.from_list(pairs), annotator_column="who")


def test_from_pairwise_conversational_explicit_and_implicit_prompt():
    user = [{"role": "user", "content": "w1"}]
    good = [{"role": "assistant", "content": "w2"}]
    bad = [{"role": "assistant", "content": "w3"}]
    explicit = from_pairwise([{"prompt": user, "chosen": good, "rejected": bad}])
    implicit = from_pairwise([{"chosen": user + good, "rejected": user + bad}])
    assert explicit == implicit == [{"prompt": user, "responses": [good, bad], "n_ranked": 1}]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "w1", "chosen": " w2", "rejected": " w2"}, "row 0: responses 0 and 1 are"),
    ({"prompt": "w1", "chosen": "", "rejected": " w2"}, "row 0: response 0 is empty"),
    ({"prompt": "w1", "chosen": " w2"}, "row 0: missing column 'rejected'"),
    ({"chosen": "w1 w2", "rejected": "w1 w3"}, "row 0: no 'prompt' column"),
])
def test_from_pairwise_bad_rows(row, message):
    with pytest.raises(ValueError, match=message):
        from_pairwise([row])


def test_from_scores_sorts_best_first_and_keeps_columns():
    rows = [{"prompt": "w1", "responses": [" a", " b", " c"], "scores": [1.0, 3.0, 2.0],
             "id": 4}]
    out = from_scores(rows)
    assert out == [{"id": 4, "prompt": "w1", "responses": [" b", " c", " a"], "n_ranked": 2}]


def test_from_scores_tie_rules():
    rows = [{"prompt": "w1", "responses": [" a", " b", " c", " d"], "scores": [5, 3, 5, 1]},
            {"prompt": "w2", "responses": [" a", " b", " c"], "scores": [9, 2, 2]},
            {"prompt": "w3", "responses": [" a", " b"], "scores": [1, 2]}]
    with pytest.raises(ValueError, match=r"row 0: responses 0 and 2 have the same score 5"):
        from_scores(rows)
    first = from_scores(rows, ties="first")
    assert first[0]["responses"] == [" a", " c", " b", " d"] and first[0]["n_ranked"] == 3
    assert first[1]["responses"] == [" a", " b", " c"] and first[1]["n_ranked"] == 2
    with pytest.warns(UserWarning, match="dropped 1 row"):
        trunc = from_scores(rows, ties="truncate")
    # Row 0 is tied at the top (says nothing); row 1 keeps "a beats {b, c}" only (top-1).
    assert [r["prompt"] for r in trunc] == ["w2", "w3"]
    assert trunc[0]["n_ranked"] == 1 and trunc[1]["n_ranked"] == 1
    assert trunc[1]["responses"] == [" b", " a"]
    with pytest.warns(UserWarning, match="dropped 2 row"):
        dropped = from_scores(rows, ties="drop")
    assert [r["prompt"] for r in dropped] == ["w3"]
    with pytest.raises(ValueError, match="ties must be one of"):
        from_scores(rows, ties="random")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "w", "responses": [" a", " b"], "scores": [1.0]}, "row 0: 2 responses but 1"),
    ({"prompt": "w", "responses": [" a", " b"], "scores": [1.0, float("nan")]},
     "row 0: score 1 must be a finite number"),
    ({"prompt": "w", "responses": [" a", " b"], "scores": [1.0, "2"]},
     "row 0: score 1 must be a finite number"),
    ({"prompt": "w", "responses": [" a"], "scores": [1.0]}, "row 0: a ranking needs at least 2"),
    ({"prompt": "w", "responses": [" a", " a"], "scores": [2, 1]}, "row 0: responses 0 and 1"),
    ({"prompt": "w", "responses": [" a", " b"]}, "row 0: missing column 'scores'"),
])
def test_from_scores_bad_rows(row, message):
    with pytest.raises(ValueError, match=message):
        from_scores([row])
