"""Maximum-likelihood values of PlackettLuceMixture on the real ranking data of the tests.

For each dataset of tests/data (Netflix movie rankings, Debian 2002 ballots) and K = 1, 2, 3,
prints one Markdown table row: the EM fit's log-likelihood (the settings of
tests/test_real_data.py), its iterations, the independent maximum (L-BFGS from random starts
over the mixture likelihood written in the test, and choix's ILSR for K = 1), their
difference, and the saturated upper bound. The independent methods are imported from the
test file itself, so the table and the test cannot drift. This is the table of
tests/data/README.md:

    python benchmarks/real_data_values.py
    python benchmarks/real_data_values.py --mm-only   # the same with newton=False
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_FILE = os.path.join(HERE, os.pardir, "tests", "test_real_data.py")

from emdpo_core.bench.harness import cpu_name, git_commit  # noqa: E402


def load_test_module():
    spec = importlib.util.spec_from_file_location("test_real_data", TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mm-only", action="store_true",
                    help="fit with newton=False (Hunter's MM steps only) for comparison")
    args = ap.parse_args(argv)
    t = load_test_module()
    import emdpo_core

    if args.mm_only:
        t.EM_PARAMS["newton"] = False
    print(f"emdpo_core {emdpo_core.__version__}, commit {git_commit()}, {cpu_name()} "
          f"({os.cpu_count()} cores); EM: {t.EM_PARAMS}; L-BFGS starts: {t.N_STARTS}")
    print()
    print("| data | K | EM log-lik | EM iterations (best run) | independent max | source | "
          "EM - independent | saturated bound |")
    print("|---|---|---|---|---|---|---|---|")
    for name, file in t.DATASETS.items():
        n_alt, orders = t.read_orders(os.path.join(t.DATA_DIR, file))
        bound = t.saturated_bound(n_alt, orders)
        for K in t.N_COMPONENTS:
            value, _, _ = t.independent_max(n_alt, orders, K, t.N_STARTS,
                                            seed=100 * K + len(name))
            source = f"L-BFGS, {t.N_STARTS} starts"
            if K == 1:
                value_choix, _ = t.choix_max(n_alt, orders)
                source += f"; choix {value_choix:.10f}"
            t0 = time.perf_counter()
            model, _, _, _ = t.fit_em(name, K)
            seconds = time.perf_counter() - t0
            print(f"| {name} | {K} | {model.loglik_:.10f} | {model.n_iter_} "
                  f"({'converged' if model.converged_ else 'NOT converged'}, {seconds:.1f} s) "
                  f"| {value:.10f} | {source} | {model.loglik_ - value:+.1e} | {bound:.10f} |")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
