"""``emdpo bench``: the microbenchmark suite, installed with the package.

Every case runs the library and its baseline in the same process on the same data, checks
that they agree (and agree with the float64 reference) before anything is timed, then times
them in interleaved rounds (each round calls every implementation once, so a change in the
machine's load hits all of them alike) and reports p20/p50/p80:

  e_step       ec.e_step                          vs vectorized PyTorch (same device)
  loss_grad    emdpo_core.torch.listwise_dpo_loss forward + backward (K policies, weights
               (K, N)) vs vectorized PyTorch through autograd; also the fused kernel alone
  e_step_loop  ec.e_step                          vs the authors' style: a Python loop over
               annotators, records and types with NumPy per list (small size)
  regret       ec.regret_matrix ("reward", "kl")  vs vectorized NumPy (PyTorch on CUDA)
  mmra         ec.mmra, the exact LP (cvxpy)      vs optimistic multiplicative weights,
               100,000 iterations (the authors' method), with its accuracy gap
  em_fit       PlackettLuceMixture.fit (default, and MM steps only) vs EM with MM steps in
               vectorized NumPy, as many iterations as the MM-only fit
  scaling_n, scaling_k, scaling_m
               the fused E-step and loss+gradient kernels against N (1e3..1e7; --quick
               1e3..1e5), K (1..64) and the list length m (2..256, fixed number of slots)

Each row records ns per (record x type), the bytes the operation must move (every input read
once, every output written once) and the fraction of the copy bandwidth measured at the start
of the same run, with the device, versions, git commit, CPU instruction set, threads and load
average. Rows are appended to a CSV (``--output``); ``benchmarks/plot_bench.py`` plots it.

This module holds the table of cases and the command; the cases live in
:mod:`.kernel_cases` (compiled kernels) and :mod:`.solver_cases` (MMRA, the EM fit), their
sizes and data in :mod:`.workload`, the timing and CSV rows in :mod:`.harness`.

Example:
    $ emdpo bench --quick --output bench.csv
    $ emdpo bench --only e_step,loss_grad --device cuda
"""

from __future__ import annotations

import argparse
import time
from typing import List

from . import harness
from .harness import FIELDS, Env, Recorder, copy_bandwidth, load_avg  # noqa: F401
from .kernel_cases import (case_e_step, case_e_step_loop, case_loss_grad, case_regret,
                           scaling_point)
from .solver_cases import case_em_fit, case_mmra
from .workload import (BETA, QUICK, Layout, Sizes, check_kernels,  # noqa: F401
                       make_layout)

__all__ = ["add_parser", "run", "CASES", "FIELDS"]

CASES = {
    "e_step": "fused E-step vs vectorized PyTorch",
    "loss_grad": "listwise DPO loss forward+backward through autograd vs vectorized PyTorch",
    "e_step_loop": "fused E-step vs the authors' per-annotator Python loop (small size)",
    "regret": "regret matrix vs vectorized NumPy (PyTorch on CUDA)",
    "mmra": "MMRA LP (cvxpy) vs multiplicative weights (100k iterations)",
    "em_fit": "PlackettLuceMixture.fit (default; MM steps only) vs MM-step EM in vectorized NumPy",
    "scaling_n": "E-step and loss+gradient kernels vs N",
    "scaling_k": "E-step and loss+gradient kernels vs K",
    "scaling_m": "E-step and loss+gradient kernels vs list length m",
}


# ----------------------------------------------------------------------------------------
# The command


_ALIASES = {"scaling": ("scaling_n", "scaling_k", "scaling_m")}


def _parse_only(text: str) -> List[str]:
    names: List[str] = []
    for name in (x.strip() for x in text.split(",")):
        if name in _ALIASES:
            names.extend(_ALIASES[name])
        elif name in CASES:
            names.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown case {name!r}; expected a comma-separated list of "
                f"{', '.join(list(CASES) + list(_ALIASES))}")
    return names


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    """Declare ``emdpo bench`` on the subparsers of the ``emdpo`` command."""
    p = sub.add_parser(
        "bench", help="run the microbenchmark suite (each case against its baseline)",
        description="Microbenchmarks of emdpo-core, each against its baseline measured in the "
                    "same run: " + "; ".join(f"{k}: {v}" for k, v in CASES.items()) + ". Rows "
                    "(p20/p50/p80, ns per record x type, bytes moved, fraction of the measured "
                    "copy bandwidth, device, versions, commit) are appended to a CSV.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes (N = 100,000; scaling up to 1e5): under a minute "
                        "on 2 cores")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the kernels and the PyTorch baselines run (default cpu); the "
                        "NumPy-only cases (e_step_loop, mmra, em_fit) always run on the CPU")
    p.add_argument("--output", "-o", default="emdpo_bench.csv", metavar="FILE.csv",
                   help="CSV file the rows are appended to (default emdpo_bench.csv)")
    p.add_argument("--only", type=_parse_only, default=None, metavar="NAME,...",
                   help="run only these cases: " + ", ".join(CASES) + " (scaling = the three "
                        "scaling tables)")
    p.add_argument("--n", type=_positive, default=None,
                   help="records of the main cases (default 1,000,000; --quick 100,000)")
    p.add_argument("--m", type=_positive, default=None, help="list length (default 4)")
    p.add_argument("--k", type=_positive, default=None, help="types (default 8)")
    p.add_argument("--repeats", type=_positive, default=None,
                   help="timed rounds per case (default 10; --quick 7); also caps the "
                        "rounds of the LP, hedge, EM-fit and scaling cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    return p


# ----------------------------------------------------------------------------------------


def run(args) -> int:
    """Run ``emdpo bench`` with parsed arguments; returns the exit status."""
    import emdpo_core as ec

    sizes = Sizes(**QUICK) if args.quick else Sizes()
    for name in ("n", "m", "k"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(sizes, {"n": "N", "k": "K"}.get(name, name), value)
    if getattr(args, "repeats", None) is not None:
        sizes.repeats = args.repeats
        for name in ("lp_repeats", "hedge_repeats", "em_fits", "scale_repeats"):
            setattr(sizes, name, min(getattr(sizes, name), args.repeats))
    if sizes.m < 2:
        raise ValueError(f"--m: expected a list length >= 2, got {sizes.m}")
    cases = args.only or list(CASES)
    torch = harness.import_torch()
    if args.device == "cuda":
        if torch is None:
            raise ValueError("--device cuda needs PyTorch (pip install torch with CUDA)")
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device "
                             "(torch.cuda.is_available() is False)")
        if not ec.build_info()["cuda"]:
            raise ValueError("--device cuda: this emdpo-core was built without CUDA; reinstall "
                             "with EMDPO_WITH_CUDA=ON (see emdpo_core.build_info())")
    env = Env(args.device, torch)
    rec = Recorder(env, args.output)
    rec.check_output()
    thread_env = f" ({env.common['thread_env']})" if env.common["thread_env"] else ""
    print(f"emdpo-core {ec.__version__} bench on {env.device_name} ({args.device}); "
          f"{env.common['threads']} threads{thread_env}, cpu_isa {env.common['cpu_isa']}, "
          f"load average {load_avg()}, commit {env.common['commit']}", flush=True)
    if torch is None:
        print("  note: torch not installed: PyTorch baselines are skipped", flush=True)
    t_start = time.perf_counter()
    env.copy_bw = copy_bandwidth(env, 1 << (28 if args.quick else 29))
    print(f"copy bandwidth (read + write): {env.copy_bw / 1e9:.1f} GB/s", flush=True)

    main_data = None
    if "e_step" in cases or "loss_grad" in cases:
        H = max(1, sizes.N // 20)
        print(f"main cases: N={sizes.N:,} lists of {sizes.m}, K={sizes.K}, H={H:,} annotators, "
              f"float32, beta={BETA}", flush=True)
        main_data = make_layout(sizes.N, sizes.m, sizes.K, H, args.seed)
        check_kernels(main_data)
    for case in cases:
        print(f"[{case}] {CASES[case]} (load average {load_avg()})", flush=True)
        if case == "e_step":
            case_e_step(rec, env, main_data, sizes.repeats)
        elif case == "loss_grad":
            case_loss_grad(rec, env, main_data, sizes.repeats)
        elif case == "e_step_loop":
            case_e_step_loop(rec, env, sizes, args.seed)
        elif case == "regret":
            case_regret(rec, env, sizes, sizes.repeats, args.seed)
        elif case == "mmra":
            case_mmra(rec, env, sizes, args.seed)
        elif case == "em_fit":
            case_em_fit(rec, env, sizes, args.seed)
        elif case == "scaling_n":
            for N in sizes.scale_N:
                scaling_point(rec, env, "N", N, sizes.m, sizes.K, sizes.scale_repeats,
                               args.seed)
        elif case == "scaling_k":
            for K in sizes.scale_K:
                scaling_point(rec, env, "K", sizes.scale_K_N, sizes.m, K,
                               sizes.scale_repeats, args.seed)
        elif case == "scaling_m":
            for m in sizes.scale_m:
                scaling_point(rec, env, "m", max(1, sizes.scale_m_slots // m), m, sizes.K,
                               sizes.scale_repeats, args.seed)
        rec.write()       # after every case: a long run that stops keeps what it measured
        if not any(c in ("e_step", "loss_grad") for c in cases[cases.index(case) + 1:]):
            main_data = None  # free it before the scaling tables
    print(f"{rec.written} rows appended to {args.output}")
    print(f"done in {time.perf_counter() - t_start:.0f} s (load average now {load_avg()})")
    return 0
