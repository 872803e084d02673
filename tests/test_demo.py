"""`emdpo demo --quick` end to end: the qualitative results, report.json and the figure."""

import json

import numpy as np
import pytest

from emdpo_core import cli

pytest.importorskip("torch", reason="the demo trains torch policies")


def test_demo_quick_shows_what_the_library_does(tmp_path, capsys):
    pytest.importorskip("cvxpy", reason="the demo's MMRA LP needs cvxpy")
    pytest.importorskip("matplotlib", reason="the demo's figure needs matplotlib")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--output", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    png = (out / "emdpo-demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    ident, em, mmra = report["identifiability"], report["em"], report["mmra"]
    # Pairs cannot identify the two polarized types; rankings of 3 can (well below half).
    assert ident["ternary"]["policy_error"] < 0.5 * ident["pairwise"]["policy_error"]
    assert ident["ternary"]["policy_error"] < 0.1
    assert ident["best_of_3"]["policy_error"] < ident["pairwise"]["policy_error"]
    # The same number of pairs from fewer annotators, several each: identified through the
    # correlation within each annotator's pairs.
    several = ident["pairwise_several"]
    assert several["records_per_annotator"] > 1
    assert several["n_records"] == ident["pairwise"]["n_records"]
    assert several["n_annotators"] * several["records_per_annotator"] == several["n_records"]
    assert several["policy_error"] < 0.5 * ident["pairwise"]["policy_error"]
    # EM-DPO recovers the three types, better than the clustering it starts from.
    assert em["type_recovery_ari"] >= 0.8
    assert em["type_recovery_ari"] >= em["cluster_dpo_ari"]
    trace = np.asarray(em["loglik_trace"])
    assert trace[-1] >= trace[0]
    # Per type, EM-DPO's policy is about as accurate as the true one; single DPO fails the
    # minority type (opposed to the majority) badly.
    acc = em["heldout_accuracy"]
    assert np.all(np.asarray(acc["em_dpo"]) > np.asarray(acc["oracle"]) - 0.03)
    assert min(acc["single_dpo"]) < min(acc["em_dpo"]) - 0.2
    # EM-DPO and cluster-DPO: held-out accuracies agree within a few standard errors.
    assert em["heldout_accuracy_gap_em_vs_cluster"] < 3 * em["heldout_accuracy_standard_error"]
    # MMRA is estimated and scored on the 128 prompts held out from training; its worst-type
    # true regret there is not above the uniform mixture's or single DPO's.
    assert mmra["n_prompts"] == em["n_test_prompts"] == 128
    assert mmra["max_regret"] <= mmra["uniform_max_regret"]
    assert mmra["max_regret"] <= mmra["single_dpo_max_regret"]
    np.testing.assert_allclose(sum(mmra["weights"]), 1.0, atol=1e-9)
    assert all(report["checks"].values())
    # the terminal summary: the three parts, their tables and the checks
    for line in ("1. Identifiability", "2. EM-DPO", "3. MMRA on the 128 held-out prompts",
                 "policy error", "single DPO", "uniform mixture", "8 per annotator",
                 "[ok] type recovery ari at least 0.8",
                 "[ok] several pairs per annotator error below half of one pair",
                 "[ok] heldout mmra not above uniform", "report.json"):
        assert line in text


def test_demo_help_names_the_default_folder(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    assert "./emdpo-demo" in " ".join(capsys.readouterr().out.split())


def test_demo_help_says_only_what_the_demo_measures(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "beats" not in text          # EM-DPO does not beat cluster-DPO on held-out accuracy
    for claim in ("agree within noise", "type recovery", "held out from training",
                  "several per annotator"):
        assert claim in text


def test_demo_rejects_a_negative_seed(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output", str(tmp_path), "--seed", "-1"]) == 1
    assert "emdpo demo: error: --seed: expected an int >= 0, got -1" in capsys.readouterr().err
