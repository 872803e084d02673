"""Benchmark of MinMax Regret Aggregation.

Measures, in one run on one machine:
  * regret_matrix: the compiled kernel against the float64 NumPy reference (the baseline),
    with the effective bandwidth (bytes of log-probabilities read / time);
  * the MMRA LP for K = 2..256: re-solving the cached DPP problem (ec.mmra) against building
    a fresh cvxpy problem every time, and against SciPy's HiGHS called directly;
  * the authors' method, optimistic multiplicative weights with 100,000 iterations
    (ec.mmra(solver="hedge")), with its accuracy: the gap of its worst-case regret to the LP
    optimum, relative to max |R|.

Correctness is checked before anything is timed. Each case prints p20/p50/p80 times and the
ratio to its baseline, and appends a row to benchmarks/results/bench_mmra.csv with the
machine, library versions and git commit.

    python benchmarks/bench_mmra.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_mmra.py --quick    # smaller sizes, a few seconds
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

import numpy as np

import emdpo_core as ec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, git_commit  # noqa: E402
from emdpo_core.ops import _reference

mmra_mod = sys.modules["emdpo_core.mmra"]  # `ec.mmra` is the function of the same name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "results", "bench_mmra.csv")
FIELDS = ["timestamp", "bench", "case", "K", "S", "repeats", "p20_ms", "p50_ms", "p80_ms",
          "baseline", "ratio_to_baseline", "accuracy", "note", "device", "cpu_count",
          "omp_threads", "load_avg_1m", "python", "numpy", "scipy", "cvxpy", "numba", "emdpo_core", "commit"]


# ----------------------------------------------------------------------------------------
# Environment and timing


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "emdpo_core": ec.__version__}
    for name in ("scipy", "cvxpy", "numba"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def timeit(fn, repeats: int, warmup: int = 1):
    """(p20, p50, p80) wall-clock milliseconds over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return tuple(float(x) for x in np.percentile(times, [20, 50, 80]))


class Recorder:
    def __init__(self, path: str):
        self.path = path
        self.common = {
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": f"cpu: {cpu_name()}",
            "cpu_count": os.cpu_count(),
            "omp_threads": ec.build_info()["num_threads"],
            # Other processes on the cores inflate multi-threaded times (a descheduled OpenMP
            # worker stalls the join); the load at the start of the run says how busy it was.
            "load_avg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
            "commit": git_commit(),
            **versions(),
        }
        self.rows = []

    def add(self, bench, case, K, S, repeats, p, baseline="", ratio="", accuracy="", note=""):
        row = dict(self.common, bench=bench, case=case, K=K, S=S, repeats=repeats,
                   p20_ms=f"{p[0]:.4g}", p50_ms=f"{p[1]:.4g}", p80_ms=f"{p[2]:.4g}",
                   baseline=baseline, ratio_to_baseline=ratio if ratio == "" else f"{ratio:.3g}",
                   accuracy=accuracy if accuracy == "" else f"{accuracy:.3g}", note=note)
        self.rows.append(row)
        extra = f"  x{ratio:.3g} vs {baseline}" if ratio != "" else ""
        acc = f"  accuracy {accuracy:.3g}" if accuracy != "" else ""
        print(f"  {bench:<14} {case:<22} K={K:<4} S={S:<8} p20/p50/p80 = "
              f"{p[0]:9.3f} /{p[1]:9.3f} /{p[2]:9.3f} ms{extra}{acc}", flush=True)

    def write(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(self.rows)
        print(f"\n{len(self.rows)} rows appended to {os.path.relpath(self.path)}")


# ----------------------------------------------------------------------------------------
# Cases


def bench_regret_matrix(rec: Recorder, sizes, repeats: int):
    print("regret_matrix: compiled kernel vs float64 NumPy reference")
    for K, S in sizes:
        rng = np.random.default_rng(K * 1000 + S)
        counts = rng.multinomial(S - K, np.full(K, 1.0 / K)) + 1  # every source >= 1 sample
        so = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        lp = rng.normal(-40.0, 3.0, size=(K, S))
        ref = rng.normal(-40.0, 3.0, size=S)
        for kind in ("reward", "kl"):
            got = ec.regret_matrix(lp, ref, so, beta=1.0, kind=kind)
            want = _reference.regret_matrix(lp, ref, so, beta=1.0, kind=kind)
            err = float(np.max(np.abs(got - want)))
            assert err < 1e-9, f"regret_matrix {kind} differs from the reference by {err}"
            p_ref = timeit(lambda: _reference.regret_matrix(lp, ref, so, beta=1.0, kind=kind),
                           max(3, repeats // 4))
            p = timeit(lambda: ec.regret_matrix(lp, ref, so, beta=1.0, kind=kind), repeats)
            # Bytes read: every log-probability once (plus the reference row for "reward").
            nbytes = lp.nbytes + (ref.nbytes if kind == "reward" else 0)
            gbs = nbytes / (p[1] * 1e-3) / 1e9
            rec.add("regret_matrix", f"numpy_reference_{kind}", K, S, max(3, repeats // 4), p_ref)
            rec.add("regret_matrix", f"kernel_{kind}", K, S, repeats, p,
                    baseline=f"numpy_reference_{kind}", ratio=p_ref[1] / p[1], accuracy=err,
                    note=f"{gbs:.2f} GB/s effective (float64 reads / p50)")


def linprog_value(M):
    from scipy.optimize import linprog

    K = M.shape[0]
    res = linprog(np.r_[np.zeros(K), 1.0], A_ub=np.c_[M, -np.ones(K)], b_ub=np.zeros(K),
                  A_eq=np.r_[np.ones(K), 0.0][None], b_eq=[1.0],
                  bounds=[(0, None)] * K + [(None, None)], method="highs")
    if res.status != 0:
        raise RuntimeError(res.message)
    return res.fun


def random_kl_regret(rng, K):
    R = rng.exponential(1.0, size=(K, K))
    np.fill_diagonal(R, 0.0)
    return R


def bench_lp(rec: Recorder, Ks, repeats: int, hedge_Ks, hedge_repeats: int):
    print("MMRA LP: DPP re-solve (ec.mmra) vs fresh cvxpy build vs SciPy HiGHS; hedge 100k")
    for K in Ks:
        rng = np.random.default_rng(K)
        mats = [random_kl_regret(rng, K) for _ in range(8)]
        # Correctness first: the cached DPP problem, a fresh build and SciPy agree.
        for R in mats[:3]:
            opt = linprog_value(R)
            got = ec.mmra(R).max_regret
            w, _ = mmra_mod._solve_lp(mmra_mod._build_lp(K), R, "HIGHS")
            fresh = float(np.max(R @ w))
            assert abs(got - opt) <= 1e-6 * abs(opt), (K, got, opt)
            assert abs(fresh - opt) <= 1e-6 * abs(opt), (K, fresh, opt)
        it = iter(range(10**9))
        nxt = (lambda: mats[next(it) % len(mats)])  # a new matrix on every call
        p_dpp = timeit(lambda: ec.mmra(nxt()), repeats)
        p_fresh = timeit(lambda: mmra_mod._solve_lp(mmra_mod._build_lp(K), nxt(), "HIGHS"),
                         max(3, repeats // 2))
        p_scipy = timeit(lambda: linprog_value(nxt()), repeats)
        rec.add("mmra_lp", "dpp_resolve", K, "", repeats, p_dpp)
        rec.add("mmra_lp", "fresh_build", K, "", max(3, repeats // 2), p_fresh,
                baseline="dpp_resolve", ratio=p_fresh[1] / p_dpp[1])
        rec.add("mmra_lp", "scipy_highs_direct", K, "", repeats, p_scipy,
                baseline="dpp_resolve", ratio=p_scipy[1] / p_dpp[1])
        if K in hedge_Ks:
            R = mats[0]
            opt = linprog_value(R)
            res = ec.mmra(R, solver="hedge")  # also compiles / loads the Numba kernel
            rel_gap = (res.max_regret - opt) / float(np.max(np.abs(R)))
            assert rel_gap >= -1e-9
            p_hedge = timeit(lambda: ec.mmra(R, solver="hedge"), hedge_repeats, warmup=0)
            rec.add("mmra_lp", "hedge_100k", K, "", hedge_repeats, p_hedge,
                    baseline="dpp_resolve", ratio=p_hedge[1] / p_dpp[1], accuracy=rel_gap,
                    note="accuracy = (max_regret - LP optimum) / max|R|")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    ap.add_argument("--csv", default=DEFAULT_CSV, help="CSV file to append rows to")
    ap.add_argument("--only", choices=("regret", "lp"), default=None,
                    help="run only the regret_matrix or only the LP/hedge cases")
    args = ap.parse_args(argv)
    rec = Recorder(args.csv)
    print(f"device: {rec.common['device']} ({rec.common['cpu_count']} cores, "
          f"{rec.common['omp_threads']} OpenMP threads, load {rec.common['load_avg_1m']}); "
          f"commit {rec.common['commit']}")
    repeats = args.repeats or (10 if args.quick else 30)
    if args.only in (None, "regret"):
        sizes = [(4, 20_000)] if args.quick else [(4, 100_000), (16, 400_000), (64, 640_000)]
        bench_regret_matrix(rec, sizes, repeats)
    if args.only in (None, "lp"):
        if args.quick:
            bench_lp(rec, [2, 8, 32, 64], repeats, hedge_Ks={2, 8, 32}, hedge_repeats=1)
        else:
            Ks = [2, 4, 8, 16, 32, 64, 128, 256]
            bench_lp(rec, Ks, repeats, hedge_Ks=set(Ks), hedge_repeats=3)
    rec.write()


if __name__ == "__main__":
    main()
