"""Benchmark of EM for a mixture of Plackett-Luce types (PlackettLuceMixture).

A planted mixture at scale (default: 100,000 annotators, 20 items, K = 5 types, 2 records
per annotator, each a full ranking of 6 of the 20 items) is fitted from k-means starts.
Measured in one run on one machine:
  * the whole fit: wall time, EM iterations, and its breakdown into initialisation, policy
    log-probabilities (the gather theta[:, items]), the E-step (fused compiled kernel +
    weighted log-likelihood), the M-step (Hunter's MM + a Newton step, Numba) and
    bookkeeping (mixture weights, M-step weights, collapse checks); against the same fit
    with MM steps only (newton=False) as the baseline;
  * one EM iteration step by step, repeated: E-step, M-step (MM only) and bookkeeping,
    p20/p50/p80, each against a vectorized NumPy implementation of the same step (the
    baseline), after checking that both give the same numbers; the E-step also as effective
    bandwidth against a memory copy measured in the same run; the default M-step (MM +
    Newton) against the MM-only one.
Rows are appended to benchmarks/results/bench_em.csv with the machine, versions and commit.

    python benchmarks/bench_em.py            # full size (about a minute on 2 cores)
    python benchmarks/bench_em.py --quick    # 5,000 annotators, a few seconds
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path
import warnings

import numpy as np

import emdpo_core as ec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, git_commit  # noqa: E402
from emdpo_core.em import _mixture
from emdpo_core.em import _plackett_luce_mm as bk
from emdpo_core.bench import numpy_baseline as nb

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "results", "bench_em.csv")
FIELDS = ["timestamp", "bench", "case", "H", "N", "M", "n_items", "K", "repeats", "p20_ms",
          "p50_ms", "p80_ms", "baseline", "ratio_to_baseline", "n_iter", "note", "device",
          "cpu_count", "omp_threads", "numba_threads", "load_avg_1m", "python", "numpy",
          "numba", "emdpo_core", "commit"]


# ----------------------------------------------------------------------------------------
# Environment


def environment() -> dict:
    import numba

    return {"device": f"cpu: {cpu_name()}", "cpu_count": os.cpu_count(),
            "omp_threads": ec.build_info()["num_threads"],
            "numba_threads": numba.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "emdpo_core": ec.__version__, "commit": git_commit()}


def percentiles(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.percentile(np.asarray(times) * 1e3, [20, 50, 80])


# ----------------------------------------------------------------------------------------
# The NumPy baseline: one EM iteration, vectorized over records of one common length m. It
# lives in the package (emdpo_core/bench/numpy_baseline.py), shared with `emdpo bench`.

numpy_e_step = nb.em_e_step
numpy_mm_step = nb.em_mm_step
numpy_bookkeeping = nb.em_bookkeeping


# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 annotators (seconds)")
    ap.add_argument("--annotators", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--types", type=int, default=5)
    ap.add_argument("--records", type=int, default=2, help="records per annotator")
    ap.add_argument("--candidates", type=int, default=6, help="candidates per record")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per step")
    ap.add_argument("--fits", type=int, default=None, help="timed full fits")
    ap.add_argument("--csv", default=DEFAULT_CSV)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    H = 5_000 if args.quick else args.annotators
    repeats = args.repeats or (5 if args.quick else 15)
    fits = args.fits or (2 if args.quick else 3)
    K, n, m = args.types, args.items, args.candidates

    rng = np.random.default_rng(args.seed)
    truth = ec.PlackettLuceMixture.from_parameters(rng.normal(scale=1.5, size=(K, n)),
                                                   np.full(K, 1.0 / K))
    data, types = truth.sample(H, records_per_annotator=args.records, candidate_size=m,
                               random_state=args.seed + 1)
    g = data.grouped()
    N, M = g.n_records, g.items.shape[0]
    env = environment()
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    base = {"timestamp": now, "bench": "em", "H": H, "N": N, "M": M, "n_items": n, "K": K,
            **env}
    print(f"planted mixture: H={H} annotators, N={N} records, M={M} slots, {n} items, K={K}; "
          f"{env['device']}, {env['cpu_count']} cores, commit {env['commit']}")

    rows = []

    # --- the whole fit: default M-step (MM + Newton), and MM steps only as the baseline -----
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ec.ConvergenceWarning)
        for newton in (False, True):                                      # JIT caches warm
            ec.PlackettLuceMixture(K, random_state=0, max_iter=2, newton=newton).fit(data)
    oracle = np.mean(truth.predict(data) == types)
    p50_mm_only = None
    for case, newton in (("fit_mm_only", False), ("fit", "auto")):
        fit_times, models = [], []
        for r in range(fits):
            t0 = time.perf_counter()
            model = ec.PlackettLuceMixture(K, random_state=r, max_iter=1000, tol=1e-6,
                                           newton=newton).fit(data)
            fit_times.append(time.perf_counter() - t0)
            models.append(model)
        model = models[int(np.argsort(fit_times)[len(fit_times) // 2])]
        p = np.percentile(np.asarray(fit_times) * 1e3, [20, 50, 80])
        tm = model.timings_
        iters = [mm.n_iter_ for mm in models]
        acc = np.mean(model.predict() == _best_match(model.predict(), types, K))
        breakdown = ", ".join(f"{k} {v:.2f}s" for k, v in tm.items() if v > 0)
        print(f"{case} (newton={newton}): p50 {p[1] / 1e3:.2f}s (p20 {p[0] / 1e3:.2f}, p80 "
              f"{p[2] / 1e3:.2f}); iterations {iters}; converged "
              f"{[mm.converged_ for mm in models]}; log-likelihood {model.loglik_:.3f}")
        print(f"  breakdown of the median fit: {breakdown}")
        print(f"  type accuracy {acc:.3f} (true-parameter classifier {oracle:.3f})")
        row = {**base, "case": case, "repeats": fits, "p20_ms": f"{p[0]:.4g}",
               "p50_ms": f"{p[1]:.4g}", "p80_ms": f"{p[2]:.4g}", "n_iter": model.n_iter_,
               "note": f"{breakdown}; loglik {model.loglik_:.3f}; accuracy {acc:.3f} vs "
                       f"oracle {oracle:.3f}"}
        if p50_mm_only is None:
            p50_mm_only = p[1]
        else:
            row.update(baseline="fit_mm_only", ratio_to_baseline=f"{p50_mm_only / p[1]:.3g}")
        rows.append(row)

    # --- one iteration, step by step, against NumPy -------------------------------------
    fam = model.family_
    theta = fam.log_worths.copy()
    log_w = np.log(model.weights_)
    items2d = g.items.reshape(N, m)
    resp, loglik, _ = model._e_step(g, log_w)
    resp_np, loglik_np = numpy_e_step(theta, items2d, g.n_ranked, g.annotator_offsets, log_w)
    np.testing.assert_allclose(loglik, loglik_np, rtol=1e-9)
    np.testing.assert_allclose(resp, resp_np, atol=1e-9)
    eta, W = _mixture.mixture_weights(resp, g.annotator_weight, 1.0), \
        _mixture.expand_record_weights(resp, g.annotator_offsets, g.record_weight, g.annotator_weight)
    eta_np, W_np = numpy_bookkeeping(resp, g.annotator_offsets)
    np.testing.assert_allclose(eta, eta_np, rtol=1e-12)
    np.testing.assert_allclose(W, W_np, rtol=1e-12)
    wins = bk.pl_wins(g.items, g.offsets, g.n_ranked, W, n)
    new = bk.pl_mm_step(g.items, g.offsets, g.n_ranked, W, wins, theta, fam.pseudo_count,
                        g.m_max)
    new_np = numpy_mm_step(theta, items2d, g.n_ranked, W, fam.pseudo_count)
    np.testing.assert_allclose(new, new_np, rtol=1e-10, atol=1e-10)
    print("one iteration matches the NumPy baseline (E-step, bookkeeping, M-step)")

    def e_ours():
        model._e_step(g, log_w)

    # The M-step with MM steps only is the operation of the NumPy baseline; the default
    # M-step (MM + Newton) is timed after, against it.
    mm_only = ec.TabularPolicies(pseudo_count=fam.pseudo_count, mm_iter=fam.mm_iter,
                                 newton=False)

    def m_ours():
        mm_only.log_worths = theta.copy()
        mm_only.m_step(g, W)

    def m_newton():
        fam.log_worths = theta.copy()
        fam.m_step(g, W)

    def book_ours():
        _mixture.mixture_weights(resp, g.annotator_weight, 1.0)
        _mixture.expand_record_weights(resp, g.annotator_offsets, g.record_weight, g.annotator_weight)

    cases = [
        ("e_step", e_ours, lambda: numpy_e_step(theta, items2d, g.n_ranked,
                                                g.annotator_offsets, log_w)),
        ("m_step", m_ours, lambda: numpy_mm_step(theta, items2d, g.n_ranked, W,
                                                 fam.pseudo_count)),
        ("bookkeeping", book_ours, lambda: numpy_bookkeeping(resp, g.annotator_offsets)),
    ]
    # Memory bandwidth of this machine, measured now: a 256 MB float64 copy (read + write),
    # far larger than the caches.
    buf = np.ones(2 ** 25)
    out = np.empty_like(buf)
    copy_ms = percentiles(lambda: np.copyto(out, buf), repeats)[1]
    copy_gbs = 2 * buf.nbytes / (copy_ms / 1e3) / 1e9
    for name, ours, baseline in cases:
        p_base = percentiles(baseline, max(3, repeats // 3))
        p = percentiles(ours, repeats)
        ratio = p_base[1] / p[1]
        note = ""
        if name == "e_step":
            # Bytes the E-step must move at least: the gathered (K, M) policy log-probs are
            # written and read, items and the ref row read, (H, K) outputs written.
            moved = 2 * K * M * 8 + M * 8 * 2 + N * 8 * 2 + 2 * H * K * 8
            gbs = moved / (p[1] / 1e3) / 1e9
            note = (f"{gbs:.2f} GB/s effective = {gbs / copy_gbs:.1%} of the {copy_gbs:.1f} GB/s "
                    f"measured by a copy; the E-step is bound by exp/log, not memory")
        print(f"{name:12s} ours p50 {p[1]:8.2f} ms (p20 {p[0]:.2f}, p80 {p[2]:.2f})   NumPy "
              f"p50 {p_base[1]:8.2f} ms   ratio {ratio:5.1f}x  {note}")
        rows.append({**base, "case": f"{name}_numpy", "repeats": max(3, repeats // 3),
                     "p20_ms": f"{p_base[0]:.4g}", "p50_ms": f"{p_base[1]:.4g}",
                     "p80_ms": f"{p_base[2]:.4g}"})
        rows.append({**base, "case": name, "repeats": repeats, "p20_ms": f"{p[0]:.4g}",
                     "p50_ms": f"{p[1]:.4g}", "p80_ms": f"{p[2]:.4g}",
                     "baseline": f"{name}_numpy", "ratio_to_baseline": f"{ratio:.3g}",
                     "note": note})
        if name == "m_step":
            p_newton = percentiles(m_newton, repeats)
            print(f"{'m_step_newton':12s} ours p50 {p_newton[1]:8.2f} ms (p20 {p_newton[0]:.2f}, "
                  f"p80 {p_newton[2]:.2f})   MM-only M-step p50 {p[1]:8.2f} ms   ratio "
                  f"{p[1] / p_newton[1]:5.2f}x  (the default M-step: MM + Newton)")
            rows.append({**base, "case": "m_step_newton", "repeats": repeats,
                         "p20_ms": f"{p_newton[0]:.4g}", "p50_ms": f"{p_newton[1]:.4g}",
                         "p80_ms": f"{p_newton[2]:.4g}", "baseline": "m_step",
                         "ratio_to_baseline": f"{p[1] / p_newton[1]:.3g}"})

    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new_file = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    print(f"appended {len(rows)} rows to {os.path.relpath(args.csv)}")
    return 0


def _best_match(pred, types, K):
    """Relabel the true types to the fitted labels by the best one-to-one matching."""
    import itertools

    best, best_acc = None, -1.0
    for perm in itertools.permutations(range(K)):
        mapped = np.asarray(perm)[types]
        acc = np.mean(mapped == pred)
        if acc > best_acc:
            best, best_acc = mapped, acc
    return best


if __name__ == "__main__":
    sys.exit(main())
