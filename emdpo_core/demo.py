"""``emdpo demo``: what the library does, end to end, on embedded synthetic data.

Three parts, each on a population from :func:`emdpo_core.datasets.make_population`:

1. Identifiability. Two polarized types (opposed rewards over 6 responses). A 2-type EM-DPO
   with tabular policies is fitted to pairs, best-of-3 choices and full rankings of 3 with one
   record per annotator (a random 2 or 3 of the 6 responses per record), and to pairs with
   several records per annotator (the same number of records, from fewer annotators); each
   fit's policy error is the mean total-variation distance between the learned and the true
   type policies after the best matching of types. With one record per annotator pairs cannot
   identify the types (the two types' pairwise choice probabilities average to 1/2 on every
   pair); rankings of 3 can. With several pairs per annotator EM identifies the types from
   the correlation between each annotator's pairs: the regime EM-DPO runs in on pairwise data.
2. EM-DPO. Three types with linear rewards over response features (two related majority
   types and a minority that disagrees with the first), several rankings of 3 per annotator
   on the training prompts, linear softmax torch policies (:class:`emdpo_core.TorchPolicies`).
   Reports type recovery (adjusted Rand index of the most probable type against the true
   type) for EM-DPO and for the clustering cluster-DPO uses, the objective trace, and each
   type's pairwise accuracy on held-out records (new annotators, prompts held out from
   training) of EM-DPO, cluster-DPO and single DPO. What it shows: EM-DPO recovers the types
   better than cluster-DPO's clustering; the two give about the same held-out accuracy
   (the difference is printed); single DPO fails the minority type.
3. MMRA on prompts held out from training (128, as in the authors' evaluation). The fitted
   policies are sampled on those prompts, the regret matrix is built from the cached
   log-probabilities (kinds "reward", the authors' regret, and "kl") and MinMax Regret
   Aggregation picks mixture weights; every served policy (the MMRA mixture, the uniform
   mixture of the type policies, single DPO) is then scored on the same held-out prompts by
   its worst-type true regret: the true reward a type loses against its own optimal policy
   (:meth:`emdpo_core.datasets.Population.regret`), also in KL-regularized form.

``run_demo`` returns the report (also written to DIR/report.json) and draws DIR/emdpo-demo.png.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Optional

import numpy as np

from ._io import atomic_write

__all__ = ["run_demo", "DEMO_TYPE_REWARDS", "DEMO_TYPE_WEIGHTS"]


def _demo_type_rewards(scale: float = 2.5, n_features: int = 6) -> np.ndarray:
    """u_0 along e_0; u_1 one radian from it (a related type); u_2 = -u_0 (a minority that
    disagrees with the majority type). Features are isotropic, so only the angles matter."""
    u = np.zeros((3, n_features))
    u[0, 0] = 1.0
    u[1, 0], u[1, 1] = np.cos(1.0), np.sin(1.0)
    u[2, 0] = -1.0
    return scale * u


DEMO_TYPE_REWARDS = _demo_type_rewards()
DEMO_TYPE_WEIGHTS = (0.45, 0.35, 0.2)

# Sizes: (full, quick).
_SIZES = {
    "id_annotators": (6000, 2000),      # identifiability: annotators (one record each)
    "id_restarts": (3, 2),
    "id_pairs_per_annotator": (8, 8),   # the several-pairs row: H / 8 annotators x 8 pairs
    "em_annotators": (600, 300),
    "em_records": (8, 8),               # rankings of 3 per annotator
    "em_prompts": (200, 100),           # training prompts
    "test_prompts": (128, 128),         # held out: accuracy and MMRA (the authors used 128)
    "em_restarts": (3, 2),
    "heldout_annotators": (400, 200),   # per type
    "mmra_samples": (25, 20),           # samples per prompt and policy
}


class _Progress:
    def __init__(self, out):
        self.out = out
        self.t0 = time.perf_counter()

    def __call__(self, msg: str = "") -> None:
        print(msg, file=self.out, flush=True)

    def step(self, msg: str) -> None:
        print(f"  [{time.perf_counter() - self.t0:6.1f} s] {msg}", file=self.out, flush=True)


def _table(rows, header, out) -> None:
    cols = list(zip(*([header] + rows)))
    width = [max(len(str(c)) for c in col) for col in cols]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(width))
    print("    " + line.format(*header), file=out)
    print("    " + "  ".join("-" * w for w in width), file=out)
    for r in rows:
        print("    " + line.format(*r), file=out)


def _log_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _module_logps(model) -> np.ndarray:
    """(K, P, A) log-probabilities of a fitted EMDPO's linear softmax policies."""
    return np.stack([m.log_probs().detach().cpu().numpy() for m in model.family_.modules])


# ----------------------------------------------------------------------------------------
# 1. Identifiability


def _identifiability(size, seeds, say, report):
    from . import diagnostics
    from .datasets import make_population, policy_error
    from .em import ConvergenceWarning, TabularPolicies
    from .em import EMDPO

    H = size("id_annotators")
    pop = make_population(2, polarized=True, n_prompts=1, n_responses=6, reward_scale=1.5,
                          n_annotators=None, random_state=seeds.pop())
    truth = pop.optimal_logps()
    per = size("id_pairs_per_annotator")
    say(f"1. Identifiability: 2 polarized types (opposed rewards) over 6 responses, {H} "
        f"records, candidate sets drawn per record; one record per annotator, or {per} pairs "
        f"per annotator ({H // per} annotators)")
    kinds = [("pairwise", "pairs (2 of 6)", 2, 1, 1),
             ("best_of_3", "best-of-3 (top choice of 3 of 6)", 3, 1, 1),
             ("ternary", "rankings of 3 (3 of 6)", 3, 2, 1),
             ("pairwise_several", f"pairs (2 of 6), {per} per annotator", 2, 1, per)]
    out = {"n_records": H, "n_responses": 6, "type_rewards": pop.rewards[:, 0].tolist()}
    rows = []
    for key, label, m, L, R in kinds:
        t0 = time.perf_counter()
        data, _ = pop.sample(H // R, records_per_annotator=R, list_size=m, n_ranked=L,
                             random_state=seeds.pop())
        rd = pop.to_ranking_data(data)
        diag = diagnostics.identifiability(rd, 2)
        notes = diag.warnings + getattr(diag, "notes", [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = EMDPO(2, TabularPolicies(pseudo_count=0.01), n_init=size("id_restarts"),
                          max_iter=300, tol=1e-6, min_weight=0.0,
                          random_state=int(seeds.pop())).fit(rd)
        not_converged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
        worths = model.family_.log_worths.reshape(model.n_components_, 1, 6)
        learned = _log_softmax(pop.ref_logps[None] + worths / pop.beta)
        err = policy_error(learned, truth)
        secs = time.perf_counter() - t0
        out[key] = {"policy_error": err, "list_size": m, "n_ranked": L,
                    "records_per_annotator": R, "n_annotators": data.n_annotators,
                    "n_records": data.n_records, "loglik_per_record": model.lower_bound_,
                    "n_iter": model.n_iter_, "converged": not not_converged,
                    "weights": model.weights_.tolist(),
                    "identifiability_warnings": notes, "seconds": secs}
        rows.append([label, str(data.n_annotators), f"{err:.3f}", str(model.n_iter_),
                     "yes" if not not_converged else "no", f"{secs:.1f}"])
        say.step(f"{label}: policy error {err:.3f}")
    say("")
    _table(rows, ["records", "annotators", "policy error", "EM iterations", "converged",
                  "seconds"], say.out)
    ratio = out["ternary"]["policy_error"] / out["pairwise"]["policy_error"]
    out["ternary_over_pairwise"] = ratio
    several = out["pairwise_several"]["policy_error"] / out["pairwise"]["policy_error"]
    out["several_pairs_over_pairwise"] = several
    say(f"    One record per annotator: rankings of 3 recover the types ({ratio:.2f}x the "
        f"pairwise error); pairs cannot, every pair's choice probability is 1/2 for the "
        f"mixture. {per} pairs per annotator: {several:.2f}x the one-pair error, identified "
        f"by the correlation between each annotator's pairs.")
    say("")
    report["identifiability"] = out


# ----------------------------------------------------------------------------------------
# 2. EM-DPO with torch policies


def _em_dpo(size, seeds, say, report):
    from .datasets import adjusted_rand_index, make_population, match_types
    from .em import EMDPO, TorchPolicies

    H, R, P = size("em_annotators"), size("em_records"), size("em_prompts")
    T = size("test_prompts")
    # Prompts 0..P-1 train; P..P+T-1 are held out (held-out accuracy, MMRA).
    pop = make_population(3, n_annotators=None, n_prompts=P + T, n_responses=8,
                          type_rewards=DEMO_TYPE_REWARDS, type_weights=DEMO_TYPE_WEIGHTS,
                          beta=1.0, random_state=seeds.pop())
    train_prompts, test_prompts = np.arange(P), np.arange(P, P + T)
    pop.data, pop.annotator_types = pop.sample(H, records_per_annotator=R, list_size=3,
                                               prompts=train_prompts, random_state=seeds.pop())
    say(f"2. EM-DPO: 3 types (shares {', '.join(f'{w:.2f}' for w in pop.type_weights)}), {H} "
        f"annotators x {R} rankings of 3 of 8 responses on {P} training prompts ({T} more "
        f"held out), linear softmax torch policies over 6 features")
    # Full-batch L-BFGS: each M-step is (nearly) exact, so EM converges in a few iterations.
    family = TorchPolicies(pop.policy_module(), beta=pop.beta, optimizer="lbfgs", lr=1.0,
                           steps=1, init_steps=3)
    t0 = time.perf_counter()
    em = EMDPO(3, family, n_init=size("em_restarts"), max_iter=50, tol=1e-6,
               random_state=int(seeds.pop())).fit(pop.data)
    t_em = time.perf_counter() - t0
    ari = adjusted_rand_index(pop.annotator_types, em.predict())
    say.step(f"EM-DPO: {em.n_iter_} iterations, {em.n_init} restarts, {t_em:.1f} s; "
             f"type recovery ARI {ari:.3f}")
    t0 = time.perf_counter()
    cluster = EMDPO(3, family, random_state=int(seeds.pop())).fit_cluster_dpo(pop.data)
    ari_cluster = adjusted_rand_index(pop.annotator_types, cluster.predict())
    say.step(f"cluster-DPO (k-means on preference directions, one DPO per cluster): ARI "
             f"{ari_cluster:.3f}, {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    single = EMDPO(1, family, max_iter=50, tol=1e-6, random_state=0).fit(pop.data)
    say.step(f"single DPO (one policy for everyone): {time.perf_counter() - t0:.1f} s")

    def matched(model):
        K = model.n_components_
        confusion = np.zeros((pop.n_types, K))
        np.add.at(confusion, (pop.annotator_types, model.predict()), 1.0)
        return match_types(-confusion)

    lp = {"em_dpo": _module_logps(em), "cluster_dpo": _module_logps(cluster),
          "single_dpo": _module_logps(single), "oracle": pop.optimal_logps()}
    match = {"em_dpo": matched(em), "cluster_dpo": matched(cluster),
             "single_dpo": np.zeros(pop.n_types, dtype=np.int64),
             "oracle": np.arange(pop.n_types)}
    acc = {k: [] for k in lp}
    n_held = size("heldout_annotators")
    for k in range(pop.n_types):
        held, _ = pop.sample(types=np.full(n_held, k), records_per_annotator=2, list_size=3,
                             prompts=test_prompts, random_state=seeds.pop())
        for name in lp:
            acc[name].append(pop.pairwise_accuracy(lp[name][match[name][k]], held))
    learned_share = em.weights_[match["em_dpo"]]
    rows = []
    for k in range(pop.n_types):
        rows.append([str(k), f"{pop.type_weights[k]:.2f} / {learned_share[k]:.2f}",
                     f"{acc['oracle'][k]:.3f}", f"{acc['em_dpo'][k]:.3f}",
                     f"{acc['cluster_dpo'][k]:.3f}", f"{acc['single_dpo'][k]:.3f}"])
    say("")
    say(f"    Held-out pairwise accuracy per true type (share of ordered pairs in new rankings "
        f"by {n_held} new annotators per type, on the held-out prompts, that the type's policy "
        f"orders correctly):")
    _table(rows, ["type", "share true/EM", "true policy", "EM-DPO", "cluster-DPO",
                  "single DPO"], say.out)
    # Each accuracy is a mean over n_held * 2 rankings * 3 ordered pairs: its binomial
    # standard error, at the accuracies seen here, is what "within noise" is measured against.
    n_pairs = n_held * 2 * 3
    se = float(np.sqrt(np.mean([a * (1 - a) for a in acc["em_dpo"]]) / n_pairs))
    gap = float(np.max(np.abs(np.subtract(acc["em_dpo"], acc["cluster_dpo"]))))
    say(f"    EM-DPO and cluster-DPO: held-out accuracies within {gap:.3f} of each other per "
        f"type (standard error of one accuracy about {se:.3f}). Where EM-DPO gains is type "
        f"recovery (adjusted Rand index): EM-DPO {ari:.3f}, cluster-DPO {ari_cluster:.3f}. "
        f"Log-likelihood per record: start {em.lower_bounds_[0]:.4f}, end "
        f"{em.lower_bound_:.4f} ({em.n_iter_} iterations).")
    say("")
    report["em"] = {
        "type_recovery_ari": ari, "cluster_dpo_ari": ari_cluster,
        "n_annotators": H, "records_per_annotator": R, "n_prompts": P, "n_responses": 8,
        "n_test_prompts": T, "heldout_accuracy_gap_em_vs_cluster": gap,
        "heldout_accuracy_standard_error": se,
        "true_weights": pop.type_weights.tolist(), "weights": learned_share.tolist(),
        "loglik_trace": em.lower_bounds_.tolist(), "n_iter": em.n_iter_,
        "converged": em.converged_, "seconds": t_em,
        "heldout_accuracy": {k: [float(a) for a in v] for k, v in acc.items()},
        "single_dpo_loglik_per_record": single.lower_bound_,
        "cluster_dpo_loglik_per_record": cluster.lower_bound_,
        "em_dpo_loglik_per_record": em.lower_bound_,
    }
    return pop, em, lp, match["em_dpo"], test_prompts


# ----------------------------------------------------------------------------------------
# 3. MMRA


def _mmra(pop, em, lp, match, test_prompts, size, seeds, say, report):
    from .mmra import mmra

    solver = None
    try:
        import cvxpy  # noqa: F401
    except ImportError:
        solver = "hedge"
        say("    (cvxpy is not installed: the MMRA LP is solved approximately by optimistic "
            "multiplicative weights; pip install cvxpy for the exact LP)")
    S = size("mmra_samples")
    contexts = {"prompt": test_prompts}
    say(f"3. MMRA on the {test_prompts.size} held-out prompts: {S} samples per prompt from each "
        f"fitted policy, regret matrices from the cached log-probabilities, then the LP")
    t0 = time.perf_counter()
    agg = {kind: em.aggregate(contexts, n_samples=S, kind=kind, solver=solver,
                              random_state=int(seeds.pop()))
           for kind in ("kl", "reward")}
    say.step(f"regret matrices and LPs: {time.perf_counter() - t0:.1f} s")
    K = em.n_components_
    # Show the fitted policies in the order of the true types they were matched to (when the
    # matching is one to one), so that weight k is the weight of type k's policy.
    order = match if np.unique(match).size == K else np.arange(K)
    policies = lp["em_dpo"][order]
    truth = pop.optimal_logps()
    oracle = mmra(pop.regret_matrix(truth, kind="reward", prompts=test_prompts), solver=solver)
    served = {
        "MMRA (kind reward)": (policies, agg["reward"].weights[order]),
        "MMRA (kind kl)": (policies, agg["kl"].weights[order]),
        "uniform mixture": (policies, np.full(K, 1.0 / K)),
        "single DPO": (lp["single_dpo"], np.ones(1)),
        "MMRA of the true policies": (truth, oracle.weights),
    }
    results = {}
    rows = []
    for name, (pols, w) in served.items():
        per = pop.regret(pols, w, kind="reward", prompts=test_prompts)
        kl = pop.regret(pols, w, kind="kl", mixture="policy", prompts=test_prompts)
        kl_out = pop.regret(pols, w, kind="kl", mixture="output", prompts=test_prompts)
        results[name] = {"weights": np.asarray(w).tolist(), "regrets": per.tolist(),
                         "max_regret": float(per.max()),
                         "kl_regrets": kl.tolist(), "kl_max_regret": float(kl.max()),
                         "kl_output_regrets": kl_out.tolist(),
                         "kl_output_max_regret": float(kl_out.max())}
        rows.append([name, ", ".join(f"{x:.2f}" for x in w), f"{per.max():.3f}",
                     ", ".join(f"{x:.3f}" for x in per), f"{kl.max():.3f}",
                     f"{kl_out.max():.3f}"])
    say("")
    say("    True regret per type on the held-out prompts: the true reward a type loses against "
        "its own optimal policy, E[r_k | pi_k*] - E[r_k | served]; 'worst' = max over types; "
        "weight k is on the policy "
        "matched to type k. KL-reg.: the loss in the KL-regularized value instead, for the "
        "drawn policy and for the mixture's output distribution:")
    _table(rows, ["served policy", "weights", "worst", "per type", "KL-reg. worst",
                  "KL-reg. output"], say.out)
    say("    (KL-regularized values also charge each policy its divergence from the reference, "
        "which favours flat compromises such as single DPO's policy.)")
    say("")
    main = results["MMRA (kind reward)"]
    report["mmra"] = {
        "kind": "reward",
        "regret_measure": "true reward lost against the type's optimal policy, max over types, "
                          "on the held-out prompts",
        "prompts": "held out from training",
        "n_prompts": int(test_prompts.size),
        "weights": main["weights"],
        "max_regret": main["max_regret"],
        "regrets": main["regrets"],
        "uniform_max_regret": results["uniform mixture"]["max_regret"],
        "single_dpo_max_regret": results["single DPO"]["max_regret"],
        "kl_kind_max_regret": results["MMRA (kind kl)"]["max_regret"],
        "true_policies_max_regret": results["MMRA of the true policies"]["max_regret"],
        "lp_max_regret": {"reward": agg["reward"].max_regret, "kl": agg["kl"].max_regret},
        "policy_order": order.tolist(),
        "regret_matrix": {
            "reward": agg["reward"].regret_matrix[np.ix_(order, order)].tolist(),
            "kl": agg["kl"].regret_matrix[np.ix_(order, order)].tolist(),
            "true_reward": pop.regret_matrix(policies, kind="reward",
                                             prompts=test_prompts).tolist(),
            "true_kl": pop.regret_matrix(policies, kind="kl", prompts=test_prompts).tolist()},
        "served": results,
        "solver": solver or "cvxpy",
    }
    return agg


# ----------------------------------------------------------------------------------------
# Figure


def _figure(report, agg, path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    ident = report["identifiability"]
    per = ident["pairwise_several"]["records_per_annotator"]
    keys = [("pairwise", "pairs"), ("best_of_3", "best-of-3"), ("ternary", "rankings of 3"),
            ("pairwise_several", f"pairs,\n{per} per annotator")]
    a = ax[0, 0]
    a.bar([lbl for _, lbl in keys], [ident[k]["policy_error"] for k, _ in keys],
          color=["#c44e52", "#dd8452", "#55a868", "#8172b3"])
    a.set_ylabel("policy error (mean TV distance)")
    a.set_title("1. Identifiability (first three: one record per annotator)", fontsize=10)
    em = report["em"]
    a = ax[0, 1]
    trace = np.asarray(em["loglik_trace"])
    a.plot(np.arange(trace.size), trace, "o-", label="EM-DPO")
    a.axhline(em["cluster_dpo_loglik_per_record"], color="#dd8452", ls="--",
              label="cluster-DPO")
    lo = min(trace.min(), em["cluster_dpo_loglik_per_record"])
    hi = max(trace.max(), em["cluster_dpo_loglik_per_record"])
    pad = 0.15 * max(hi - lo, 1e-3)
    a.set_ylim(lo - pad, hi + pad)
    a.plot([], [], " ", label=f"single DPO: {em['single_dpo_loglik_per_record']:.3f}")
    a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a.set_xlabel("EM iteration")
    a.set_ylabel("log-likelihood per record")
    a.set_title(f"2. EM-DPO objective (type ARI {em['type_recovery_ari']:.2f})")
    a.legend()
    a = ax[0, 2]
    acc = em["heldout_accuracy"]
    names = [("oracle", "true policy"), ("em_dpo", "EM-DPO"), ("cluster_dpo", "cluster-DPO"),
             ("single_dpo", "single DPO")]
    K = len(acc["oracle"])
    width = 0.8 / len(names)
    for i, (k, lbl) in enumerate(names):
        a.bar(np.arange(K) + (i - 1.5) * width, acc[k], width, label=lbl)
    a.set_xticks(np.arange(K), [f"type {k}" for k in range(K)])
    lo = min(min(v) for v in acc.values())
    a.set_ylim(max(0.0, lo - 0.05), 1.0)
    a.set_ylabel("held-out pairwise accuracy")
    a.set_title("2. Per-type accuracy, held-out annotators and prompts", fontsize=10)
    a.legend(fontsize=8)
    m = report["mmra"]
    a = ax[1, 0]
    R = np.asarray(m["regret_matrix"]["reward"])
    im = a.imshow(R, cmap="viridis")
    for (i, j), v in np.ndenumerate(R):
        a.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < R.max() / 2 else "k")
    a.set_xticks(np.arange(R.shape[1]))
    a.set_yticks(np.arange(R.shape[0]))
    a.set_xlabel("policy j (matched to type j)")
    a.set_ylabel("type k")
    a.set_title("3. Regret matrix R[k, j] (kind reward, held-out prompts)", fontsize=10)
    fig.colorbar(im, ax=a)
    a = ax[1, 1]
    w = m["weights"]
    a.bar([f"policy of type {j}" for j in range(len(w))], w, color="#4c72b0")
    a.set_ylim(0, 1)
    a.set_title("3. MMRA mixture weights")
    a = ax[1, 2]
    served = m["served"]
    labels = ["MMRA (kind reward)", "uniform mixture", "single DPO"]
    regrets = np.asarray([served[k]["regrets"] for k in labels])       # (3, K)
    for i, lbl in enumerate(labels):
        a.bar(np.arange(regrets.shape[1]) + (i - 1) * 0.27, regrets[i], 0.27, label=lbl)
    for i, lbl in enumerate(labels):
        a.axhline(regrets[i].max(), color=f"C{i}", ls=":", lw=1)
    a.set_xticks(np.arange(regrets.shape[1]), [f"type {k}" for k in range(regrets.shape[1])])
    a.set_ylabel("true reward regret (dotted: worst type)")
    a.set_title("3. True regret per type, held-out prompts", fontsize=10)
    a.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def run_demo(output: str = "emdpo-demo", *, quick: bool = False, seed: int = 0,
             out=None) -> dict:
    """Run the three parts of the demo, print their tables, write ``output``/report.json and
    ``output``/emdpo-demo.png (when matplotlib is installed); returns the report dict.

    Args:
        output: folder for the report and the figure (created).
        quick: smaller populations (about a third of the time).
        seed: seed of everything random (populations, restarts, samples).
        out: text stream for the progress and the tables (default sys.stdout).
    """
    import torch

    out = sys.stdout if out is None else out
    say = _Progress(out)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    os.makedirs(output, exist_ok=True)
    which = 1 if quick else 0

    def size(name):
        return _SIZES[name][which]

    # Independent streams for every random step, in a fixed order.
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(64)]
    seeds.reverse()

    # One thread for torch, the OpenMP kernels and Numba. The problems here are small, so a
    # parallel region costs more in synchronization than it gains; on a busy machine a
    # region whose second thread is descheduled waits a scheduler slice (measured on a
    # shared 2-core machine: a 0.2 ms Numba step took 2 to 12 ms with 2 threads), and
    # torch's idle OpenMP threads spin on the cores the kernels' threads need.
    import numba

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    from . import __version__, build_info

    info = build_info()
    say(f"emdpo demo {'(quick) ' if quick else ''}- emdpo-core {__version__}, seed {seed}, "
        f"CPU kernels {info['cpu_isa']}, one thread")
    say("")
    report = {"version": __version__, "seed": int(seed), "quick": bool(quick)}
    t_start = time.perf_counter()
    timings = {}
    try:
        t0 = time.perf_counter()
        _identifiability(size, seeds, say, report)
        timings["identifiability"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pop, em, lp, match, test_prompts = _em_dpo(size, seeds, say, report)
        timings["em"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        agg = _mmra(pop, em, lp, match, test_prompts, size, seeds, say, report)
        timings["mmra"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        numba.set_num_threads(numba_threads)
    t0 = time.perf_counter()
    fig = _figure(report, agg, os.path.join(output, "emdpo-demo.png"))
    timings["figure"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report["timings"] = timings
    report["figure"] = None if fig is None else os.path.basename(fig)
    ident, em_r, m = report["identifiability"], report["em"], report["mmra"]
    checks = {
        "ternary_error_below_half_of_pairwise":
            ident["ternary"]["policy_error"] < 0.5 * ident["pairwise"]["policy_error"],
        "several_pairs_per_annotator_error_below_half_of_one_pair":
            ident["pairwise_several"]["policy_error"] < 0.5 * ident["pairwise"]["policy_error"],
        "type_recovery_ari_at_least_0.8": em_r["type_recovery_ari"] >= 0.8,
        "heldout_mmra_not_above_uniform": m["max_regret"] <= m["uniform_max_regret"],
        "heldout_mmra_not_above_single_dpo": m["max_regret"] <= m["single_dpo_max_regret"],
    }
    report["checks"] = checks
    path = os.path.join(output, "report.json")
    with atomic_write(path, "w") as f:
        json.dump(_jsonable(report), f, indent=2)
    say("Summary")
    say(f"    policy error, one record per annotator: pairs {ident['pairwise']['policy_error']:.3f}"
        f", best-of-3 {ident['best_of_3']['policy_error']:.3f}, rankings of 3 "
        f"{ident['ternary']['policy_error']:.3f}; pairs, "
        f"{ident['pairwise_several']['records_per_annotator']} per annotator "
        f"{ident['pairwise_several']['policy_error']:.3f}")
    say(f"    EM-DPO type recovery ARI {em_r['type_recovery_ari']:.3f} (cluster-DPO "
        f"{em_r['cluster_dpo_ari']:.3f}); held-out accuracy EM-DPO vs cluster-DPO within "
        f"{em_r['heldout_accuracy_gap_em_vs_cluster']:.3f} per type (standard error "
        f"{em_r['heldout_accuracy_standard_error']:.3f})")
    say(f"    worst-type true regret on {m['n_prompts']} held-out prompts: MMRA "
        f"{m['max_regret']:.3f}, uniform mixture "
        f"{m['uniform_max_regret']:.3f}, single DPO {m['single_dpo_max_regret']:.3f} (best "
        f"possible mixture of the true type policies {m['true_policies_max_regret']:.3f})")
    for name, ok in checks.items():
        say(f"    [{'ok' if ok else 'FAILED'}] {name.replace('_', ' ')}")
    say(f"    wrote {path}" + ("" if fig is None else f" and {fig}") +
        ("" if fig is not None else " (no figure: pip install matplotlib)"))
    say(f"    total {timings['total']:.1f} s")
    return report
