"""EMDPO on the EM engine: the tabular family (exact M-steps, monotone), the torch family
(reaches the tabular solution, joint = type by type, reset, minibatches, checkpoints,
save/load), cluster-DPO, single DPO, aggregate (MMRA) and every error path."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import CUDA_ONLY

import emdpo_core as ec
from emdpo_core import PlackettLuceMixture, PreferenceData, RankingData

torch = pytest.importorskip("torch", reason="the torch policy family needs torch")

# Tiny models: one torch thread (see conftest.single_torch_thread).
pytestmark = [pytest.mark.filterwarnings("ignore::emdpo_core.ConvergenceWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


def planted(seed, K=2, n_items=6, H=150, records=2, candidate_size=4, scale=1.5):
    rng = np.random.default_rng(seed)
    truth = PlackettLuceMixture.from_parameters(rng.normal(scale=scale, size=(K, n_items)),
                                                np.full(K, 1.0 / K))
    data, types = truth.sample(H, records_per_annotator=records, candidate_size=candidate_size,
                               random_state=seed + 1)
    return truth, data, types


class TabularSoftmax(torch.nn.Module):
    """pi(item) = softmax(logits)[item]: a tabular policy as a torch module."""

    def __init__(self, n_items):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(n_items, dtype=torch.float64))

    def forward(self, item):
        return torch.log_softmax(self.logits, 0)[item]


def as_preferences(data: RankingData) -> PreferenceData:
    """The same records for a torch policy: slot input = item id; uniform reference."""
    return PreferenceData(data.offsets, {"item": data.items},
                          ref_logps=np.full(data.items.shape[0], -np.log(data.n_items)),
                          n_ranked=data.n_ranked, annotator=data.annotator,
                          sample_weight=data.sample_weight)


def assert_monotone(trace, what=""):
    """Each objective value >= the previous one, up to float64 rounding of sums of ~1e3
    terms (relative 1e-12; a real decrease is far larger)."""
    trace = np.asarray(trace)
    slack = 1e-12 * np.maximum(1.0, np.abs(trace[1:]))
    bad = np.flatnonzero(np.diff(trace) < -slack)
    assert bad.size == 0, f"{what}: objective decreased at iteration {bad[0] + 1}"


def small_population(seed=0, H=80, records=4, K=2):
    from emdpo_core.datasets import make_population

    return make_population(K, n_annotators=H, records_per_annotator=records, n_prompts=20,
                           n_responses=6, n_features=4, reward_scale=2.5, random_state=seed)


def lbfgs_family(pop, **kw):
    params = dict(beta=pop.beta, optimizer="lbfgs", lr=1.0, steps=1, init_steps=3)
    params.update(kw)
    return ec.TorchPolicies(pop.policy_module(), **params)


def thetas(model):
    return np.stack([m.theta.detach().numpy() for m in model.family_.modules])


# ----------------------------------------------------------------------------------------
# The tabular family: exact M-steps


@pytest.mark.parametrize("n_ranked", [None, 1])
def test_tabular_emdpo_objective_never_decreases(n_ranked):
    _, data, _ = planted(1, K=3, n_items=8, H=300, records=3)
    if n_ranked is not None:
        data = RankingData(data.items, data.offsets, np.full(data.n_records, n_ranked),
                           annotator=data.annotator)
    model = ec.EMDPO(3, ec.TabularPolicies(), max_iter=200, tol=0.0,
                     random_state=2).fit(data)
    assert model.n_iter_ == 200
    assert_monotone(model.lower_bounds_, f"n_ranked={n_ranked}")
    assert model.lower_bounds_[-1] > model.lower_bounds_[0]


def test_tabular_emdpo_is_plackett_luce_mixture():
    _, data, _ = planted(3, K=2, H=200)
    a = ec.EMDPO(2, ec.TabularPolicies(pseudo_count=0.05), max_iter=80, n_init=2, tol=1e-6,
                 random_state=4).fit(data)
    b = PlackettLuceMixture(2, pseudo_count=0.05, max_iter=80, n_init=2, tol=1e-6,
                            random_state=4).fit(data)
    np.testing.assert_array_equal(a.lower_bounds_, b.lower_bounds_)
    np.testing.assert_array_equal(a.family_.log_worths, b.family_.log_worths)
    np.testing.assert_array_equal(a.responsibilities_, b.responsibilities_)


def test_default_family_is_tabular_and_the_given_family_is_not_modified():
    _, data, _ = planted(5)
    fam = ec.TabularPolicies()
    model = ec.EMDPO(2, fam, max_iter=5, random_state=0).fit(data)
    assert fam.log_worths is None and model.family_ is not fam
    assert isinstance(ec.EMDPO(2, max_iter=3).fit(data).family_, ec.TabularPolicies)


# ----------------------------------------------------------------------------------------
# The torch family


def test_torch_family_reaches_the_tabular_solution_on_tabular_data():
    _, data, _ = planted(70, K=2, n_items=6, H=150, records=2)
    init = np.random.default_rng(71).dirichlet([1, 1], size=150)
    tab = ec.EMDPO(2, ec.TabularPolicies(pseudo_count=0.0), init_params=init, tol=1e-10,
                   max_iter=3000).fit(data)
    fam = ec.TorchPolicies(TabularSoftmax(data.n_items), beta=1.0, optimizer="lbfgs", lr=1.0,
                           steps=1)
    em = ec.EMDPO(2, fam, init_params=init, tol=1e-10, max_iter=500,
                  random_state=0).fit(as_preferences(data))
    # beta (log pi - log pi_ref) = logits + const are the log-worths.
    worths = np.stack([m.logits.detach().numpy() for m in em.family_.modules])
    worths -= worths.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(em.loglik_, tab.loglik_, rtol=1e-7)
    # The likelihood is flat near its maximum: 1e-7 in the log-likelihood leaves about 1e-3 in
    # the parameters (the existing gradient-family test of test_em.py uses the same bound).
    tab_worths = tab.family_.log_worths - tab.family_.log_worths.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(worths, tab_worths, atol=2e-3)
    np.testing.assert_allclose(em.weights_, tab.weights_, atol=1e-4)
    # Posteriors move with the parameters: measured 2e-4 apart here, like the worths.
    np.testing.assert_allclose(em.responsibilities_, tab.responsibilities_, atol=1e-3)


def test_torch_emdpo_recovers_planted_types_and_improves_the_objective():
    from emdpo_core.datasets import adjusted_rand_index

    pop = small_population(0, H=120, records=6, K=2)
    model = ec.EMDPO(2, lbfgs_family(pop), max_iter=30, random_state=0).fit(pop.data)
    assert model.lower_bounds_[-1] >= model.lower_bounds_[0]
    # LBFGS M-steps are (nearly) exact, so the generalized EM is monotone up to the inner
    # solver's tolerance (tolerance_change 1e-9 per step, in the loss per record).
    assert np.all(np.diff(model.lower_bounds_) > -1e-7)
    assert adjusted_rand_index(pop.annotator_types, model.predict()) > 0.8
    # the fitted policies point along the true reward directions (after matching)
    th = thetas(model)
    cos = th @ pop.type_rewards.T / np.linalg.norm(th, axis=1)[:, None] / \
        np.linalg.norm(pop.type_rewards, axis=1)[None]
    assert max(cos[0, 0] + cos[1, 1], cos[0, 1] + cos[1, 0]) > 2 * 0.9


def test_joint_and_type_by_type_m_steps_are_the_same_objective():
    # Adam is per parameter and the types share no parameters, so one optimizer over all
    # types (one kernel call for K policies) takes the same steps as one per type.
    pop = small_population(1)
    fits = []
    for joint in (True, False):
        fam = ec.TorchPolicies(pop.policy_module(), beta=1.0, optimizer="adam", lr=0.05,
                               steps=15, joint=joint)
        fits.append(ec.EMDPO(2, fam, max_iter=4, random_state=3).fit(pop.data))
    np.testing.assert_allclose(thetas(fits[0]), thetas(fits[1]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fits[0].lower_bounds_, fits[1].lower_bounds_, rtol=1e-12)


def test_reset_restarts_every_m_step_from_the_initial_policy():
    pop = small_population(2)
    g = pop.data.grouped()
    rng = np.random.default_rng(0)
    W = rng.dirichlet([1, 1], size=g.n_records).T.copy()
    fam = ec.TorchPolicies(pop.policy_module(), beta=1.0, optimizer="adam", lr=0.05, steps=5,
                           reset=True)
    fam.initialize(g, W, np.random.default_rng(1))
    fam.m_step(g, W)
    first = [m.theta.detach().clone() for m in fam.modules]
    fam.m_step(g, W)                  # from the initial (reference) policy again
    for m, t in zip(fam.modules, first):
        torch.testing.assert_close(m.theta, t, rtol=0, atol=0)
    warm = ec.TorchPolicies(pop.policy_module(), beta=1.0, optimizer="adam", lr=0.05, steps=5)
    warm.initialize(g, W, np.random.default_rng(1))
    warm.m_step(g, W)
    warm.m_step(g, W)                 # continues: moves on
    assert not torch.allclose(warm.modules[0].theta, first[0])


def test_minibatch_epochs_are_deterministic_and_train():
    pop = small_population(3)
    runs = []
    for _ in range(2):
        fam = ec.TorchPolicies(pop.policy_module(), beta=1.0, optimizer="adam", lr=0.05,
                               epochs=2, batch_size=37)
        runs.append(ec.EMDPO(2, fam, max_iter=6, random_state=5).fit(pop.data))
    np.testing.assert_array_equal(thetas(runs[0]), thetas(runs[1]))
    assert runs[0].lower_bounds_[-1] > runs[0].lower_bounds_[0]


def test_interrupted_torch_fit_resumes_to_the_same_result(tmp_path):
    pop = small_population(4)
    path = tmp_path / "ck.npz"
    full = ec.EMDPO(2, lbfgs_family(pop), max_iter=8, tol=0.0, n_init=2,
                    random_state=6).fit(pop.data)

    def stop(info):
        if info["restart"] == 1 and info["iteration"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ec.EMDPO(2, lbfgs_family(pop), max_iter=8, tol=0.0, n_init=2, random_state=6,
                 checkpoint=path).fit(pop.data, callback=stop)
    resumed = ec.EMDPO.load(path, policies=lbfgs_family(pop)).fit(pop.data)
    np.testing.assert_array_equal(resumed.lower_bounds_, full.lower_bounds_)
    np.testing.assert_array_equal(thetas(resumed), thetas(full))
    np.testing.assert_array_equal(resumed.responsibilities_, full.responsibilities_)


def test_save_and_load_round_trip_with_reset_states(tmp_path):
    pop = small_population(5)
    fam = ec.TorchPolicies(pop.policy_module(), beta=1.0, optimizer="adam", lr=0.05, steps=5,
                           reset=True)
    model = ec.EMDPO(2, fam, max_iter=3, random_state=0).fit(pop.data)
    model.save(tmp_path / "m.npz")
    back = ec.EMDPO.load(tmp_path / "m.npz", policies=fam)
    np.testing.assert_array_equal(thetas(back), thetas(model))
    np.testing.assert_allclose(back.predict_proba(pop.data), model.predict_proba(pop.data),
                               rtol=1e-12)
    assert len(back.family_._initial) == 2       # reset=True keeps the initial policies


def test_loading_with_the_wrong_family_says_so(tmp_path):
    pop = small_population(15)
    ec.EMDPO(2, lbfgs_family(pop), max_iter=2, random_state=0).fit(pop.data).save(
        tmp_path / "torch.npz")
    with pytest.raises(ValueError, match="not the state of TabularPolicies"):
        ec.EMDPO.load(tmp_path / "torch.npz")
    ec.EMDPO(2, max_iter=2).fit(planted(0)[1]).save(tmp_path / "tab.npz")
    with pytest.raises(ValueError, match="not the state of TorchPolicies"):
        ec.EMDPO.load(tmp_path / "tab.npz", policies=lbfgs_family(pop))
    assert isinstance(ec.EMDPO.load(tmp_path / "tab.npz").family_, ec.TabularPolicies)


def test_float32_policies_fit_like_float64():
    pop = small_population(16)
    fits = [ec.EMDPO(2, ec.TorchPolicies(pop.policy_module(dtype=dt), beta=1.0,
                                         optimizer="lbfgs", steps=1, init_steps=3),
                     max_iter=5, random_state=0).fit(pop.data) for dt in ("float64", "float32")]
    assert fits[1].family_.modules[0].theta.dtype == torch.float32
    # float32 log-probabilities (eps 1.2e-7) in sums over ~1e3 slots and an L-BFGS stopping
    # tolerance of 1e-7: objectives agree to about 1e-5 relative.
    np.testing.assert_allclose(fits[1].lower_bounds_, fits[0].lower_bounds_, rtol=1e-4)
    np.testing.assert_array_equal(fits[1].predict(), fits[0].predict())


def test_reference_module_gives_the_slot_reference_log_probabilities():
    pop = small_population(6)
    d = pop.data
    no_ref = PreferenceData(d.offsets, d.inputs, n_ranked=d.n_ranked, annotator=d.annotator,
                            features=d.features)
    a = ec.EMDPO(2, lbfgs_family(pop), max_iter=3, random_state=1).fit(d)
    b = ec.EMDPO(2, lbfgs_family(pop), max_iter=3, random_state=1).fit(no_ref)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-12)


def test_single_dpo_is_k1_and_cluster_dpo_trains_on_hard_clusters():
    pop = small_population(7)
    single = ec.EMDPO(1, lbfgs_family(pop), max_iter=10).fit(pop.data)
    assert single.n_components_ == 1 and np.all(single.responsibilities_ == 1.0)
    labels = pop.annotator_types
    # Type by type: the same L-BFGS problem as fitting each cluster alone (a joint L-BFGS
    # shares one line search and stopping test across the types).
    cl = ec.EMDPO(2, lbfgs_family(pop, joint=False),
                  random_state=0).fit_cluster_dpo(pop.data, labels)
    assert cl.n_iter_ == 0 and cl.converged_
    np.testing.assert_array_equal(cl.predict(), labels)
    np.testing.assert_allclose(cl.weights_, np.bincount(labels) / labels.size)
    # Each policy is the DPO fit of its cluster's records alone: K = 1 on that cluster.
    d = pop.data
    for k in range(2):
        keep = np.flatnonzero(np.repeat(labels, 4) == k)
        sub = PreferenceData(np.arange(keep.size + 1) * 3,
                             {n: v.reshape(-1, 3)[keep].reshape(-1) for n, v in d.inputs.items()},
                             ref_logps=d.ref_logps.reshape(-1, 3)[keep].reshape(-1))
        alone = ec.EMDPO(1, lbfgs_family(pop), max_iter=1).fit(sub)
        # The same optimizer path on the same records; sums in another order (the weights of
        # the other cluster's records are exact zeros) move it by rounding only.
        np.testing.assert_allclose(thetas(cl)[k], thetas(alone)[0], rtol=1e-6, atol=1e-8)


def test_kmeans_start_uses_preference_directions():
    pop = small_population(8, H=100, records=8)
    fam = lbfgs_family(pop)
    X = fam.annotator_features(pop.data.grouped())
    assert X.shape == (100, pop.type_rewards.shape[1])
    # annotators point along their type's reward direction, on average
    for k in range(2):
        mean = X[pop.annotator_types == k].mean(axis=0)
        assert mean @ pop.type_rewards[k] > 0.5 * np.linalg.norm(mean) * \
            np.linalg.norm(pop.type_rewards[k])


# ----------------------------------------------------------------------------------------
# Aggregation (MMRA)


def test_tabular_aggregate_uses_the_exact_regret_matrix():
    truth = PlackettLuceMixture.from_parameters([[2.0, 1, 0, -1], [-1.0, 0, 1, 2]], [0.5, 0.5])
    data, _ = truth.sample(400, random_state=0)
    model = ec.EMDPO(2, ec.TabularPolicies(), random_state=0).fit(data)
    res = model.aggregate(kind="kl", solver="hedge")
    t = model.family_.log_worths
    logp = t - np.logaddexp.reduce(t, axis=1, keepdims=True)
    p = np.exp(logp)
    R = np.array([[np.sum(p[j] * (logp[j] - logp[k])) for j in range(2)] for k in range(2)])
    np.testing.assert_allclose(res.regret_matrix, R, rtol=1e-10, atol=1e-12)
    assert res.kind == "kl" and abs(res.weights.sum() - 1.0) < 1e-9
    # the reward kind: beta (A_kk - A_kj), A_kj = E_j[log pi_k - log pi_ref]
    rew = model.aggregate(kind="reward", solver="hedge")
    A = np.array([[np.sum(p[j] * (logp[k] + np.log(4))) for j in range(2)] for k in range(2)])
    np.testing.assert_allclose(rew.regret_matrix, np.diag(A)[:, None] - A, rtol=1e-10,
                               atol=1e-12)
    sub = model.aggregate([[0, 1], [2, 3, 1]], solver="hedge")
    assert sub.regret_matrix.shape == (2, 2)


def test_torch_aggregate_estimates_the_regret_matrix_from_samples():
    pytest.importorskip("cvxpy", reason="the MMRA LP needs cvxpy")
    pop = small_population(9, H=150, records=6)
    model = ec.EMDPO(2, lbfgs_family(pop), max_iter=10, random_state=0).fit(pop.data)
    res = model.aggregate({"prompt": np.arange(pop.n_prompts)}, n_samples=200, kind="kl",
                          random_state=0)
    lp = np.stack([m.log_probs().detach().numpy() for m in model.family_.modules])
    p = np.exp(lp)
    exact = np.array([[np.mean(np.sum(p[j] * (lp[j] - lp[k]), axis=1)) for j in range(2)]
                      for k in range(2)])
    # 4000 samples per policy: the Monte-Carlo standard error of each entry is below 0.05
    # here (per-sample log-ratio spread about 3 / sqrt(4000)); 0.15 is 3 of them.
    np.testing.assert_allclose(res.regret_matrix, exact, atol=0.15)
    np.testing.assert_allclose(res.regrets, res.regret_matrix @ res.weights, rtol=1e-9)
    again = model.aggregate({"prompt": np.arange(pop.n_prompts)}, n_samples=200, kind="kl",
                            random_state=0)
    np.testing.assert_array_equal(again.regret_matrix, res.regret_matrix)


# ----------------------------------------------------------------------------------------
# Errors


def test_torch_policies_argument_errors():
    pop = small_population(10)
    pol = pop.policy_module()
    cases = [
        (dict(policy=3), TypeError, "policy: expected a torch.nn.Module"),
        (dict(policy=[]), TypeError, "policy: a list must hold"),
        (dict(policy=pol, optimizer="rmsprop"), ValueError, "optimizer: expected one of"),
        (dict(policy=pol, optimizer=3), TypeError, "optimizer: expected a name or a callable"),
        (dict(policy=pol, steps=2, epochs=1), ValueError, "give one of them"),
        (dict(policy=pol, optimizer="lbfgs", batch_size=10), ValueError, "full-batch"),
        (dict(policy=pol, beta=0.0), ValueError, "beta: expected a finite number > 0"),
        (dict(policy=pol, steps=0), ValueError, "steps: expected an int >= 1"),
        (dict(policy=pol, logp_fn="x"), TypeError, "logp_fn: expected a callable"),
        (dict(policy=pol, reference="x"), TypeError, "reference: expected a torch.nn.Module"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            ec.TorchPolicies(**kw)


def test_fit_errors_name_the_problem():
    pop = small_population(11)
    _, tab_data, _ = planted(0)
    with pytest.raises(TypeError, match="TorchPolicies fit PreferenceData, got GroupedRankings"):
        ec.EMDPO(2, lbfgs_family(pop)).fit(tab_data)
    with pytest.raises(TypeError, match="tabular policies fit RankingData"):
        ec.EMDPO(2, ec.TabularPolicies()).fit(pop.data)
    with pytest.raises(TypeError, match="policies: expected a PolicyFamily"):
        ec.EMDPO(2, "tabular").fit(tab_data)
    with pytest.raises(TypeError, match="data: expected a PreferenceData or a RankingData"):
        ec.EMDPO(2).fit([[0, 1]])
    d = pop.data
    bare = PreferenceData(d.offsets, d.inputs, n_ranked=d.n_ranked, annotator=d.annotator)
    factory = ec.TorchPolicies(lambda k: pop.policy_module(), beta=1.0)
    with pytest.raises(ValueError, match="has no ref_logps and the family has no reference"):
        ec.EMDPO(2, factory).fit(bare)
    no_features = PreferenceData(d.offsets, d.inputs, ref_logps=d.ref_logps,
                                 n_ranked=d.n_ranked, annotator=d.annotator)
    with pytest.raises(NotImplementedError, match="needs annotator features"):
        ec.EMDPO(2, lbfgs_family(pop)).fit(no_features)
    ec.EMDPO(2, lbfgs_family(pop), init_params="random", max_iter=2).fit(no_features)
    bad_logp = ec.TorchPolicies(pop.policy_module(), logp_fn=lambda m, b: m(**b)[:-1])
    with pytest.raises(ValueError, match=r"logp_fn: expected a tensor of shape \(\d+,\)"):
        ec.EMDPO(2, bad_logp).fit(d)
    with pytest.raises(ValueError, match="policy: 1 modules were given"):
        ec.EMDPO(2, ec.TorchPolicies([pop.policy_module()])).fit(d)
    with pytest.raises(TypeError, match="the factory returned a int"):
        ec.EMDPO(2, ec.TorchPolicies(lambda k: 3, reference=pop.policy_module())).fit(d)


def test_cluster_dpo_and_aggregate_errors():
    pop = small_population(12)
    with pytest.raises(ValueError, match=r"labels: expected \(80,\) integer cluster ids"):
        ec.EMDPO(2, lbfgs_family(pop)).fit_cluster_dpo(pop.data, np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="labels: expected ids in \\[0, 2\\), got 5"):
        ec.EMDPO(2, lbfgs_family(pop)).fit_cluster_dpo(pop.data, np.full(80, 5))
    with pytest.raises(ValueError, match="cluster-DPO needs a clustering"):
        ec.EMDPO(2, lbfgs_family(pop), init_params="dirichlet").fit_cluster_dpo(pop.data)
    with pytest.raises(RuntimeError, match="not fitted"):
        ec.EMDPO(2, lbfgs_family(pop)).aggregate({"prompt": [0]})
    model = ec.EMDPO(2, lbfgs_family(pop), max_iter=2, random_state=0).fit(pop.data)
    with pytest.raises(ValueError, match="kind: expected 'kl' or 'reward'"):
        model.aggregate({"prompt": [0]}, kind="regret")
    with pytest.raises(TypeError, match="contexts: expected a non-empty dict"):
        model.aggregate([0, 1])
    factory = ec.EMDPO(2, ec.TorchPolicies(lambda k: pop.policy_module(), beta=1.0,
                                           optimizer="lbfgs", steps=1), max_iter=2,
                       random_state=0).fit(pop.data)
    with pytest.raises(ValueError, match="kind='reward' needs the reference"):
        factory.aggregate({"prompt": [0, 1]}, kind="reward")
    tab = ec.EMDPO(2, ec.TabularPolicies(), max_iter=3).fit(planted(0)[1])
    with pytest.raises(ValueError, match="contexts: entry 0 must be at least 2 distinct"):
        tab.aggregate([[1]])


def test_pairs_only_preference_data_warns():
    # One comparison per annotator: the case that cannot identify the types (several per
    # annotator get a note instead, see test_science.py).
    pop = small_population(13)
    pairs, _ = pop.sample(40, records_per_annotator=1, list_size=2, random_state=0)
    with pytest.warns(ec.IdentifiabilityWarning, match="binary comparisons cannot identify"):
        ec.EMDPO(2, lbfgs_family(pop), max_iter=1).fit(pairs)


def test_import_emdpo_core_does_not_import_torch():
    from conftest import SUBPROCESS_CWD

    code = ("import sys, numpy as np, emdpo_core as ec\n"
            "from emdpo_core.datasets import make_population, policy_error\n"
            "pop = make_population(2, n_annotators=30, records_per_annotator=2, random_state=0)\n"
            "rd = pop.to_ranking_data(pop.data)\n"
            "m = ec.EMDPO(2, ec.TabularPolicies(), max_iter=3, random_state=0).fit(rd)\n"
            "pop.regret(pop.optimal_logps()[0])\n"
            "import emdpo_core.cli, emdpo_core.demo, emdpo_core.emdpo\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                       text=True, timeout=120, cwd=SUBPROCESS_CWD)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_torch_family_on_cuda_matches_cpu(device):
    pop = small_population(14)
    cpu = ec.EMDPO(2, lbfgs_family(pop), max_iter=5, random_state=0).fit(pop.data)
    gpu_family = ec.TorchPolicies(pop.policy_module().to(device), beta=1.0, optimizer="lbfgs",
                                  lr=1.0, steps=1, init_steps=3)
    gpu = ec.EMDPO(2, gpu_family, max_iter=5, random_state=0).fit(pop.data)
    # Same float64 math on another device: reductions in another order (1e-9 relative).
    np.testing.assert_allclose(gpu.lower_bounds_, cpu.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(np.stack([m.theta.detach().cpu().numpy()
                                         for m in gpu.family_.modules]), thetas(cpu),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("module", ["emdpo_core.em.emdpo", "emdpo_core.em.torch_policies",
                                    "emdpo_core.datasets", "emdpo_core._torch_models"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    if module == "emdpo_core.em.emdpo":
        pytest.importorskip("cvxpy", reason="the EMDPO example aggregates with the MMRA LP")
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
