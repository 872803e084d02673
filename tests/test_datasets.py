"""Synthetic populations (determinism, record kinds, Plackett-Luce frequencies, regrets against
their definitions), type-matching metrics, and PreferenceData (layout, grouping, errors)."""

import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core import PreferenceData
from emdpo_core.datasets import (adjusted_rand_index, make_population, match_types,
                                 policy_error)


def test_same_seed_same_population_other_seed_other_population():
    a = make_population(3, n_annotators=50, records_per_annotator=3, random_state=7)
    b = make_population(3, n_annotators=50, records_per_annotator=3, random_state=7)
    c = make_population(3, n_annotators=50, records_per_annotator=3, random_state=8)
    for name in ("features", "type_rewards", "type_weights", "ref_logps", "annotator_types"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("prompt", "response"):
        np.testing.assert_array_equal(a.data.inputs[name], b.data.inputs[name])
    np.testing.assert_array_equal(a.data.ref_logps, b.data.ref_logps)
    assert not np.array_equal(a.features, c.features)
    assert a.data.grouped().fingerprint() == b.data.grouped().fingerprint()
    assert a.data.grouped().fingerprint() != c.data.grouped().fingerprint()


@pytest.mark.parametrize("m,L", [(2, 1), (3, 1), (3, 2), (5, 3)])
def test_record_kinds_and_varying_candidate_sets(m, L):
    pop = make_population(2, n_annotators=40, records_per_annotator=5, list_size=m,
                          n_ranked=L, n_prompts=3, n_responses=6, random_state=0)
    d = pop.data
    assert d.n_records == 200 and np.all(d.list_lengths == m) and np.all(d.n_ranked == L)
    assert d.n_annotators == 40 and d.features.shape == (200 * m, pop.type_rewards.shape[1])
    resp = d.inputs["response"].reshape(-1, m)
    prompt = d.inputs["prompt"].reshape(-1, m)
    assert np.all(prompt == prompt[:, :1])                   # one prompt per record
    assert all(np.unique(r).size == m for r in resp)         # distinct responses
    assert np.unique(np.sort(resp, axis=1), axis=0).shape[0] > 5     # sets vary per record
    np.testing.assert_allclose(d.ref_logps, -np.log(6))
    np.testing.assert_array_equal(d.features, pop.features[d.inputs["prompt"],
                                                            d.inputs["response"]])


def test_rankings_follow_plackett_luce_on_the_true_rewards():
    pop = make_population(1, n_annotators=20000, list_size=3, n_prompts=1, n_responses=4,
                          random_state=1)
    d = pop.data
    resp = d.inputs["response"].reshape(-1, 3)
    r = pop.rewards[0, 0]
    # P(top = a | candidate set S) = exp(r_a) / sum_S exp(r): check for the set {0, 1, 2}.
    rows = np.flatnonzero(np.all(np.sort(resp, axis=1) == [0, 1, 2], axis=1))
    p = np.exp(r[:3]) / np.exp(r[:3]).sum()
    freq = np.bincount(resp[rows, 0], minlength=3) / rows.size
    # 5 binomial standard errors: a false alarm has probability about 1e-6 per entry.
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(p * (1 - p) / rows.size).max())


def test_polarized_types_are_opposed_and_type_weights_are_used():
    pop = make_population(2, polarized=True, n_annotators=4000, random_state=2)
    np.testing.assert_allclose(pop.type_rewards[0], -pop.type_rewards[1])
    np.testing.assert_allclose(np.linalg.norm(pop.type_rewards, axis=1), 2.0)
    skewed = make_population(2, type_weights=[3, 1], n_annotators=4000, random_state=3)
    share = np.mean(skewed.annotator_types == 0)
    assert abs(share - 0.75) < 5 * np.sqrt(0.75 * 0.25 / 4000)


def test_regret_matches_its_definitions():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(5, 4))
    pop = make_population(3, n_annotators=None, n_prompts=5, n_responses=4, reference=ref,
                          beta=0.7, random_state=4)
    opt = pop.optimal_logps()
    r = pop.rewards
    # two arbitrary policies and a mixture of them
    lp = rng.normal(size=(2, 5, 4))
    lp -= np.log(np.exp(lp).sum(axis=2, keepdims=True))
    w = np.array([0.3, 0.7])
    q = np.einsum("j,jpa->pa", w, np.exp(lp))

    def value(k, pi):   # J_k(pi) = E_x [E_pi r_k - beta KL(pi || ref)]
        kl = np.sum(pi * (np.log(pi) - pop.ref_logps), axis=1)
        return np.mean(np.sum(pi * r[k], axis=1) - pop.beta * kl)

    for k in range(3):
        best = value(k, np.exp(opt[k]))
        np.testing.assert_allclose(pop.regret(lp, w, kind="kl", mixture="output")[k],
                                   best - value(k, q), rtol=1e-10)
        np.testing.assert_allclose(pop.regret(lp, w, kind="kl", mixture="policy")[k],
                                   best - sum(w[j] * value(k, np.exp(lp[j])) for j in range(2)),
                                   rtol=1e-10)
        gain = np.mean(np.sum(np.exp(opt[k]) * r[k], axis=1))
        np.testing.assert_allclose(pop.regret(lp, w, kind="reward")[k],
                                   gain - np.mean(np.sum(q * r[k], axis=1)), rtol=1e-10)
    # each type's optimal policy has no regret for it; the optimum is the Gibbs policy
    np.testing.assert_allclose(np.diag(pop.regret_matrix(opt, kind="kl")), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(pop.regret_matrix(opt, kind="reward")), 0.0, atol=1e-12)
    assert np.all(pop.regret(lp, w, kind="kl", mixture="output") <=
                  pop.regret(lp, w, kind="kl", mixture="policy") + 1e-12)


def test_policy_module_and_tabular_view():
    torch = pytest.importorskip("torch")
    pop = make_population(2, n_annotators=30, records_per_annotator=2, n_prompts=4,
                          n_responses=5, reference=np.zeros((4, 5)), beta=0.5, random_state=5)
    for k in range(2):
        module = pop.policy_module(pop.type_rewards[k] / pop.beta)
        np.testing.assert_allclose(module.log_probs().detach().numpy(), pop.optimal_logps()[k],
                                   atol=1e-12)
    module = pop.policy_module()
    d = pop.data
    lp = module(prompt=torch.as_tensor(d.inputs["prompt"]),
                response=torch.as_tensor(d.inputs["response"])).detach().numpy()
    np.testing.assert_allclose(lp, d.ref_logps, atol=1e-12)
    s = module.sample(torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert s["response"].shape == (4,) and int(s["response"].max()) < 5
    rd = pop.to_ranking_data(d)
    np.testing.assert_array_equal(rd.items, d.inputs["prompt"] * 5 + d.inputs["response"])
    assert rd.n_items == 20 and rd.n_annotators == 30


def test_pairwise_accuracy():
    pop = make_population(2, n_annotators=3000, list_size=3, n_prompts=10, random_state=6)
    truth = pop.optimal_logps()
    held, _ = pop.sample(types=np.zeros(3000, dtype=np.int64), list_size=3, random_state=7)
    acc = pop.pairwise_accuracy(truth[0], held)
    # a ranking of 3 gives 3 ordered pairs; the reversed order gets exactly the others
    assert abs(acc + pop.pairwise_accuracy(-truth[0], held) - 1.0) < 1e-12
    assert acc > 0.6 and pop.pairwise_accuracy(np.zeros_like(truth[0]), held) == 0.5


def test_adjusted_rand_index_and_matching():
    # By hand: contingency table [[2, 1], [0, 2]] -> sum C(n_ij, 2) = 2; rows (3, 2) and
    # columns (2, 3) both give 3 + 1 = 4 pairs; C(5, 2) = 10 pairs in all;
    # ARI = (2 - 4 * 4 / 10) / ((4 + 4) / 2 - 4 * 4 / 10) = 1/6.
    a = [0, 0, 0, 1, 1]
    b = [0, 0, 1, 1, 1]
    expected = (2 - 4 * 4 / 10) / (4 - 4 * 4 / 10)
    assert abs(adjusted_rand_index(a, b) - expected) < 1e-12
    assert adjusted_rand_index(a, [5, 5, 5, 9, 9]) == 1.0
    rng = np.random.default_rng(0)
    assert abs(adjusted_rand_index(rng.integers(0, 3, 5000), rng.integers(0, 3, 5000))) < 0.01
    np.testing.assert_array_equal(match_types([[5, 1, 9], [0, 7, 8]]), [1, 0])
    np.testing.assert_array_equal(match_types([[5, 1], [0, 7], [3, 3]]), [1, 0, 0])
    t = np.log(np.array([[[0.7, 0.2, 0.1]], [[0.1, 0.1, 0.8]]]))
    assert policy_error(t[::-1], t) == 0.0
    assert abs(policy_error(t[[0, 0]], t) - 0.5 * 0.7) < 1e-12     # TV(t0, t1) = 0.7
    with pytest.raises(ValueError, match="labels_pred: expected the shape"):
        adjusted_rand_index([0, 1], [0])


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(n_types=0), ValueError, "n_types: expected an int >= 1"),
    (dict(n_types=3, polarized=True), ValueError, "polarized: needs n_types=2"),
    (dict(n_types=2, type_rewards=np.ones((3, 2))), ValueError,
     r"type_rewards: expected a finite \(2, D\)"),
    (dict(n_types=2, type_weights=[1, -1]), ValueError, "type_weights: expected 2 positive"),
    (dict(n_types=2, reference="zipf"), ValueError, "reference: expected 'uniform'"),
    (dict(n_types=2, n_prompts=2, n_responses=3, reference=np.zeros((3, 3))), ValueError,
     r"reference: expected a finite \(2, 3\) array"),
    (dict(n_types=2, beta=0), ValueError, "beta: expected a finite number > 0"),
    (dict(n_types=2, list_size=9, n_responses=8), ValueError, "list_size: expected at most"),
    (dict(n_types=2, list_size=3, n_ranked=3), ValueError, "n_ranked: expected at most"),
])
def test_make_population_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        make_population(**kwargs)


def test_population_method_errors():
    pop = make_population(2, n_annotators=10, n_prompts=3, n_responses=4, random_state=0)
    with pytest.raises(ValueError, match=r"policy_logps: expected shape \(J, 3, 4\)"):
        pop.regret(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="weights: expected 2 probabilities"):
        pop.regret(pop.optimal_logps(), [0.5, 0.6])
    with pytest.raises(ValueError, match="kind: expected 'reward' or 'kl'"):
        pop.regret(pop.optimal_logps()[0], kind="value")
    with pytest.raises(ValueError, match=r"types: expected types in \[0, 2\)"):
        pop.sample(types=np.array([0, 2]))
    with pytest.raises(ValueError, match="give n_annotators or types"):
        pop.sample()


# ----------------------------------------------------------------------------------------
# PreferenceData


def test_preference_data_groups_inputs_with_the_records():
    inputs = {"prompt": np.array([0, 0, 1, 1, 1, 2, 2]),
              "response": np.array([10, 11, 12, 13, 14, 15, 16])}
    d = PreferenceData([0, 2, 5, 7], inputs, ref_logps=np.arange(7.0), annotator=["b", "a", "b"],
                       features=np.arange(14.0).reshape(7, 2))
    g = d.grouped()
    # annotator "a" (record 1) first, then "b" (records 0 and 2)
    np.testing.assert_array_equal(g.offsets, [0, 3, 5, 7])
    np.testing.assert_array_equal(g.inputs["response"], [12, 13, 14, 10, 11, 15, 16])
    np.testing.assert_array_equal(g.ref_logps, [2, 3, 4, 0, 1, 5, 6])
    np.testing.assert_array_equal(g.features[:, 0], [4, 6, 8, 0, 2, 10, 12])
    np.testing.assert_array_equal(g.annotator_offsets, [0, 1, 3])
    assert d.grouped() is g and d.n_annotators == 2 and d.n_slots == 7


def test_preference_data_torch_inputs_are_permuted_too():
    torch = pytest.importorskip("torch")
    d = PreferenceData([0, 2, 4], {"tok": torch.arange(8).reshape(4, 2)}, annotator=[1, 0])
    np.testing.assert_array_equal(d.grouped().inputs["tok"].numpy(),
                                  [[4, 5], [6, 7], [0, 1], [2, 3]])


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(offsets=[0, 1, 3]), ValueError, r"record 0 spans offsets\[0\]=0 to offsets\[1\]=1"),
    (dict(offsets=[1, 3]), ValueError, r"offsets\[0\] == 0"),
    (dict(offsets=[0]), ValueError, "at least one record"),
    (dict(inputs={}), TypeError, "inputs: expected a non-empty dict"),
    (dict(inputs={"x": np.arange(3)}), ValueError,
     r"inputs\['x'\]: expected first axis of length M = offsets\[-1\] = 4"),
    (dict(inputs={1: np.arange(4)}), TypeError, "keys must be strings"),
    (dict(ref_logps=[0.0, np.nan, 0, 0]), ValueError,
     "ref_logps: expected finite log-probabilities, got nan at slot 1"),
    (dict(ref_logps=np.zeros(3)), ValueError, r"ref_logps: expected shape \(4,\)"),
    (dict(n_ranked=[2, 1]), ValueError, "n_ranked: record 0 has m=2 candidates"),
    (dict(annotator=[0]), ValueError, r"annotator: expected shape \(2,\)"),
    (dict(sample_weight=[1, -1]), ValueError, "sample_weight: expected finite values >= 0"),
    (dict(features=np.zeros((4,))), ValueError, r"features: expected shape \(4, D\)"),
    (dict(features=np.full((4, 2), np.inf)), ValueError, "features: expected finite values, row 0"),
])
def test_preference_data_errors(kwargs, err, match):
    args = dict(offsets=[0, 2, 4], inputs={"x": np.arange(4)})
    args.update(kwargs)
    with pytest.raises(err, match=match):
        PreferenceData(args.pop("offsets"), args.pop("inputs"), **args)


def test_preference_data_is_exported():
    assert ec.PreferenceData is PreferenceData and "PreferenceData" in ec.__all__
