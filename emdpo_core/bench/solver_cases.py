"""The ``emdpo bench`` cases of whole algorithms: MinMax Regret Aggregation (the exact LP
against optimistic multiplicative weights, the authors' method) and the EM fit of a
Plackett-Luce mixture (against EM with MM steps in vectorized NumPy)."""

from __future__ import annotations

import numpy as np

from .harness import Env, Recorder, rounds
from .workload import Sizes


def _random_kl_regret(rng, K: int) -> np.ndarray:
    R = rng.exponential(1.0, size=(K, K))
    np.fill_diagonal(R, 0.0)
    return R


def case_mmra(rec: Recorder, env: Env, sizes: Sizes, seed: int) -> None:
    import emdpo_core as ec

    try:
        import cvxpy  # noqa: F401
    except ImportError:
        msg = "cvxpy not installed: MMRA LP rows skipped (pip install 'emdpo-core[mmra]')"
        print(f"  note: {msg}", flush=True)
        rec.add("main", "mmra", "skipped", None, note=msg, device="cpu")
        return
    for K in sizes.mmra_K:
        rng = np.random.default_rng(seed + K)
        mats = [_random_kl_regret(rng, K) for _ in range(4)]
        R = mats[0]
        lp = ec.mmra(R)
        if not str(lp.status).startswith("optimal"):
            raise RuntimeError(f"mmra: the LP for K={K} ended with status {lp.status!r}")
        # The LP optimum: no mixture has a lower worst regret, in particular not the uniform
        # one nor any single policy.
        best_simple = min([float(np.max(R @ np.full(K, 1.0 / K)))] +
                          [float(np.max(R[:, j])) for j in range(K)])
        hedge = ec.mmra(R, solver="hedge")        # also compiles / loads the Numba kernel
        gap = (hedge.max_regret - lp.max_regret) / float(np.max(np.abs(R)))
        # HiGHS's feasibility tolerance is 1e-7; the regrets are O(1).
        if lp.max_regret > best_simple + 1e-6 or gap < -1e-6:
            raise RuntimeError(f"mmra K={K}: the LP's max regret {lp.max_regret} is above the "
                               f"uniform or a single policy's ({best_simple}) or hedge's "
                               f"({hedge.max_regret})")
        it = iter(range(10 ** 9))
        # Different repeat counts (hedge is slow), so timed apart, not in the same rounds.
        t_lp = rounds({"lp": lambda: ec.mmra(mats[next(it) % len(mats)])}, sizes.lp_repeats,
                       lambda: None)
        t_h = rounds({"hedge": lambda: ec.mmra(R, solver="hedge")}, sizes.hedge_repeats,
                      lambda: None, warmup=0)
        shape = dict(K=K, dtype="float64", device="cpu")
        rec.add("main", "mmra", "emdpo_lp", t_lp["lp"], baseline="hedge_100k",
                baseline_times=t_h["hedge"], accuracy="0", others=t_lp.others,
                note=f"exact LP ({lp.status}), a new matrix each call", **shape)
        rec.add("main", "mmra", "hedge_100k", t_h["hedge"], accuracy=f"{gap:.3g}",
                others=t_h.others, note="accuracy = (max regret - LP optimum) / max|R|",
                **shape)


def case_em_fit(rec: Recorder, env: Env, sizes: Sizes, seed: int) -> None:
    import emdpo_core as ec
    from emdpo_core.bench import numpy_baseline as nb

    K, n_items, m, H = sizes.em_K, 20, 6, sizes.em_H
    rng = np.random.default_rng(seed)
    truth = ec.PlackettLuceMixture.from_parameters(rng.normal(scale=1.5, size=(K, n_items)),
                                                   np.full(K, 1.0 / K))
    data, _ = truth.sample(H, records_per_annotator=2, candidate_size=m,
                           random_state=seed + 1)
    g = data.grouped()
    N = g.n_records
    # Two fits: the default (each MM step followed by a safeguarded Newton step) and MM steps
    # only, the algorithm of the NumPy baseline. The first fits also compile (or load) the
    # Numba kernels; fits are deterministic, so every timed fit runs the same iterations.
    def fit(newton):
        return ec.PlackettLuceMixture(K, random_state=0, max_iter=1000, tol=1e-6,
                                      newton=newton).fit(data)

    model, model_mm = fit("auto"), fit(False)
    n_iter, n_iter_mm = model.n_iter_, model_mm.n_iter_
    # Same numbers first: one E-step of the baseline against the fitted model's.
    fam = model_mm.family_
    theta, log_w = fam.log_worths.copy(), np.log(model_mm.weights_)
    items2d = g.items.reshape(N, m)
    resp, loglik, _ = model_mm._e_step(g, log_w)
    resp_np, loglik_np = nb.em_e_step(theta, items2d, g.n_ranked, g.annotator_offsets, log_w)
    np.testing.assert_allclose(loglik_np, loglik, rtol=1e-9)
    np.testing.assert_allclose(resp_np, resp, atol=1e-9)
    start = np.random.default_rng(seed + 2).normal(size=(K, n_items))
    t = rounds({
        "emdpo": lambda: fit("auto"),
        "emdpo_mm": lambda: fit(False),
        "numpy_em": lambda: nb.em_iterations(start, np.full(K, -np.log(K)), items2d,
                                             g.n_ranked, g.annotator_offsets,
                                             fam.pseudo_count, n_iter_mm),
    }, sizes.em_fits, lambda: None, warmup=0)
    shape = dict(N=N, m=m, K=K, H=H, dtype="float64", device="cpu", others=t.others)
    rec.add("main", "em_fit", "emdpo", t["emdpo"], baseline="numpy_em",
            baseline_times=t["numpy_em"], work=N * K * n_iter,
            note=f"default fit (MM + Newton steps, k-means init) to tol 1e-6: {n_iter} "
                 f"iterations; the baseline reaches that tolerance in {n_iter_mm} MM "
                 f"iterations; ns per (record x type) per iteration", **shape)
    rec.add("main", "em_fit", "emdpo_mm", t["emdpo_mm"], baseline="numpy_em",
            baseline_times=t["numpy_em"], work=N * K * n_iter_mm,
            note=f"MM steps only (newton=False), the baseline's algorithm: {n_iter_mm} "
                 f"iterations incl. k-means init", **shape)
    rec.add("main", "em_fit", "numpy_em", t["numpy_em"], work=N * K * n_iter_mm,
            note=f"{n_iter_mm} EM iterations (E-step, weights, MM step), no init", **shape)
