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

Example:
    $ emdpo bench --quick --output bench.csv
    $ emdpo bench --only e_step,loss_grad --device cuda
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._io import atomic_write, check_writable

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
_ALIASES = {"scaling": ("scaling_n", "scaling_k", "scaling_m")}

FIELDS = ["run_id", "timestamp", "table", "case", "impl", "baseline", "device", "device_name",
          "dtype", "N", "m", "K", "H", "repeats", "p20_ms", "p50_ms", "p80_ms", "speedup_p50",
          "speedup_paired", "ns_per_record_type", "bytes_moved", "GB_per_s",
          "bandwidth_fraction", "copy_GB_per_s", "accuracy", "note", "cpu_isa", "threads",
          "thread_env", "load_avg", "others_cores", "python", "numpy", "torch", "cvxpy",
          "numba", "emdpo_core", "cuda_build", "commit"]

BETA = 0.5


# ----------------------------------------------------------------------------------------
# Sizes


@dataclass
class Sizes:
    N: int = 1_000_000              # the main cases: N lists of m, K types, float32
    m: int = 4
    K: int = 8
    repeats: int = 10
    loop_N: int = 10_000            # e_step_loop: the Python loop's size
    regret: Sequence[Tuple[int, int]] = ((8, 2_000_000), (64, 1_000_000))   # (K, samples)
    mmra_K: Sequence[int] = (8, 32, 128)
    lp_repeats: int = 20
    hedge_repeats: int = 3
    em_H: int = 100_000             # annotators, 2 records each, 6 of 20 items per record
    em_K: int = 5
    em_fits: int = 3
    scale_N: Sequence[int] = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
    scale_K: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)
    scale_K_N: int = 1_000_000
    scale_m: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256)
    scale_m_slots: int = 4_000_000  # N = slots / m
    scale_repeats: int = 5


QUICK = dict(N=100_000, repeats=7, loop_N=1_000, regret=((8, 200_000),), mmra_K=(8, 32),
             lp_repeats=10, hedge_repeats=3, em_H=3_000, em_K=4, em_fits=3,
             scale_N=(1_000, 10_000, 100_000), scale_K_N=100_000, scale_m_slots=400_000,
             scale_repeats=5)


# ----------------------------------------------------------------------------------------
# Command line


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
# Environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return ""


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "missing"


def _thread_env() -> str:
    """The threading settings from the environment, e.g. "OMP_WAIT_POLICY=passive": they
    change the figures a lot on a shared machine (see benchmarks/README.md)."""
    names = sorted(k for k in os.environ if k.startswith(("OMP_", "GOMP_", "KMP_", "NUMBA_NUM",
                                                          "NUMBA_THREADING", "MKL_NUM")))
    return " ".join(f"{k}={os.environ[k]}" for k in names)


def git_commit() -> str:
    """The git commit the installed package was built from ("-dirty" when tracked files
    differed from it), or "unknown" (built from an sdist, or without git)."""
    try:
        from .._build_commit import GIT_COMMIT
    except ImportError:
        return "unknown"
    return GIT_COMMIT or "unknown"


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


class _Env:
    """What every row records about the machine and the software."""

    def __init__(self, device: str, torch):
        import emdpo_core as ec

        info = ec.build_info()
        self.device = device
        self.torch = torch
        if device == "cuda":
            self.device_name = torch.cuda.get_device_name()
            self.sync: Callable[[], None] = torch.cuda.synchronize
        else:
            self.device_name = f"{_cpu_name()} ({os.cpu_count()} cores)"
            self.sync = lambda: None
        threads = f"omp={info['num_threads']}"
        if torch is not None:
            if device == "cpu":
                # The baseline gets the cores the kernels get.
                torch.set_num_threads(info["num_threads"])
            threads += f",torch={torch.get_num_threads()}"
        self.common = {
            # UTC start time, plus a random tag so that two runs in one second differ.
            "run_id": _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S-")
                      + secrets.token_hex(2),
            "device": device, "device_name": self.device_name, "cpu_isa": info["cpu_isa"],
            "threads": threads, "thread_env": _thread_env(),
            "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__ if torch else "missing",
            "cvxpy": _version("cvxpy"), "numba": _version("numba"),
            "emdpo_core": ec.__version__, "cuda_build": str(info["cuda"]),
            "commit": git_commit(),
        }
        self.copy_bw = float("nan")


# ----------------------------------------------------------------------------------------
# Timing and rows


def _cpu_ticks() -> Optional[Tuple[int, int]]:
    """(busy clock ticks of the whole machine, ticks of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
        # user nice system idle iowait irq softirq steal; utime stime (fields 14, 15)
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], int(mine[11]) + int(mine[12])
    except (OSError, ValueError, IndexError):
        return None


class Timings(dict):
    """name -> seconds per call (array); `others` is the average number of cores that other
    processes kept busy meanwhile (None where /proc is missing): on a shared machine it says
    how much of the CPU this measurement really had."""

    others: Optional[float] = None


def _rounds(fns: Dict[str, Callable[[], object]], repeats: int, sync, warmup: int = 1):
    """Seconds per call of each fn over `repeats` interleaved rounds, after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    ticks0, t_start = _cpu_ticks(), time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    out = Timings((name, np.asarray(t)) for name, t in times.items())
    ticks1, elapsed = _cpu_ticks(), time.perf_counter() - t_start
    if ticks0 and ticks1 and elapsed > 0.05:   # /proc counts in ticks of 10 ms
        busy, mine = ticks1[0] - ticks0[0], ticks1[1] - ticks0[1]
        out.others = max(0.0, (busy - mine) / os.sysconf("SC_CLK_TCK") / elapsed)
    return out


def copy_bandwidth(env: _Env, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a plain copy of nbytes (read + write counted): the practical
    memory-bandwidth limit the kernels are compared with."""
    if env.device == "cuda":
        torch = env.torch
        src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
        dst = torch.empty_like(src)
        t = _rounds({"copy": lambda: dst.copy_(src)}, repeats, env.sync)["copy"]
    else:
        src = np.ones(nbytes // 8)
        dst = np.empty_like(src)
        t = _rounds({"copy": lambda: np.copyto(dst, src)}, repeats, env.sync)["copy"]
    return 2 * nbytes / float(np.median(t))


def _nbytes(*arrays) -> int:
    total = 0
    for a in arrays:
        if a is None:
            continue
        if hasattr(a, "element_size"):           # torch tensor
            total += a.element_size() * a.numel()
        else:
            total += np.asarray(a).nbytes
    return total


class Recorder:
    """Collects rows, prints each as it is measured, appends them to the CSV at the end."""

    def __init__(self, env: _Env, path: str):
        self.env = env
        self.path = path
        self.rows: List[dict] = []
        self.written = 0

    def add(self, table: str, case: str, impl: str, times, *, N="", m="", K="", H="",
            dtype="", baseline: str = "", baseline_times=None, work: Optional[float] = None,
            nbytes: Optional[int] = None, accuracy="", note: str = "",
            device: str = "", others: Optional[float] = None) -> dict:
        row = dict(self.env.common, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"), table=table, case=case, impl=impl, baseline=baseline,
            dtype=dtype, N=N, m=m, K=K, H=H, accuracy=accuracy, note=note,
            load_avg=_load_avg(), others_cores="" if others is None else f"{others:.2f}")
        if device:     # a CPU-only case in a --device cuda run
            row["device"] = device
            if device == "cpu":
                row["device_name"] = f"{_cpu_name()} ({os.cpu_count()} cores)"
        size = {"N": f"N={N:,}" if N != "" else "", "K": f"K={K}", "m": f"m={m}"}.get(
            table, " ".join(f"{k}={v:,}" for k, v in (("N", N), ("K", K)) if v != ""))
        line = f"  {case:<14} {impl:<17} {size:<14}"
        if times is not None:
            p20, p50, p80 = (float(x) for x in np.percentile(times, [20, 50, 80]))
            row.update(repeats=len(times), p20_ms=f"{p20 * 1e3:.4g}",
                       p50_ms=f"{p50 * 1e3:.4g}", p80_ms=f"{p80 * 1e3:.4g}")
            line += f" p50 {p50 * 1e3:10.3f} ms [{p20 * 1e3:.3f}, {p80 * 1e3:.3f}]"
            if baseline_times is not None:
                speedup = float(np.median(baseline_times)) / p50
                row["speedup_p50"] = f"{speedup:.3g}"
                line += f"  {speedup:7.2f}x vs {baseline}"
                if len(baseline_times) == len(times):
                    # Ratio within each round, then the median: robust to load drifting.
                    paired = float(np.median(np.asarray(baseline_times) / times))
                    row["speedup_paired"] = f"{paired:.3g}"
                    line += f" (paired {paired:.2f}x)"
            if work:
                ns = p50 * 1e9 / work
                row["ns_per_record_type"] = f"{ns:.4g}"
                line += f"  {ns:.3g} ns/(rec*type)"
            if nbytes:
                gbs = nbytes / p50
                row.update(bytes_moved=nbytes, GB_per_s=f"{gbs / 1e9:.4g}",
                           bandwidth_fraction=f"{gbs / self.env.copy_bw:.3g}",
                           copy_GB_per_s=f"{self.env.copy_bw / 1e9:.4g}")
                line += f"  {gbs / 1e9:.2f} GB/s = {gbs / self.env.copy_bw:.1%} of copy"
        if others is not None and others >= 0.25:
            line += f"  [others used {others:.1f} cores]"
        if accuracy != "":
            line += f"  accuracy {accuracy}"
        if note:
            line += f"  ({note})"
        print(line, flush=True)
        self.rows.append(row)
        return row

    def check_output(self) -> None:
        """Fail before measuring anything when the CSV cannot take these rows."""
        path = self.path
        if os.path.isdir(path):
            raise ValueError(f"--output {path}: is a directory; expected a CSV file name")
        check_writable(path, "--output")
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != FIELDS:
                raise ValueError(f"--output {path}: the file exists with other columns; give "
                                 f"a new file name (columns: {', '.join(FIELDS)})")

    def write(self) -> None:
        """Append the rows not yet written."""
        rows = self.rows[self.written:]
        if not rows:
            return
        path = self.path
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        old = ""
        if os.path.exists(path):
            with open(path, newline="", encoding="utf-8") as f:
                old = f.read()
        # appending = rewriting the whole file atomically: a reader (or a run that is killed
        # midway) never sees a torn row
        with atomic_write(path, "w", newline="") as f:
            f.write(old)
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if not old:
                w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in FIELDS})
        self.written = len(self.rows)


# ----------------------------------------------------------------------------------------
# Data


@dataclass
class Layout:
    """Random lists of m responses, K types, records grouped by annotator, float32."""

    N: int
    m: int
    K: int
    H: int
    policy: np.ndarray = field(repr=False)       # (K, M)
    ref: np.ndarray = field(repr=False)          # (M,)
    offsets: np.ndarray = field(repr=False)      # (N+1,)
    aoff: np.ndarray = field(repr=False)         # (H+1,)
    weights: np.ndarray = field(repr=False)      # (K, N) M-step weights
    log_w: np.ndarray = field(repr=False)        # (K,) float64


def make_layout(N: int, m: int, K: int, H: int, seed: int) -> Layout:
    rng = np.random.default_rng(seed)
    M = N * m
    # Drawn in float32 and shifted in place: no float64 temporaries at N = 1e7.
    policy = rng.standard_normal((K, M), dtype=np.float32)
    policy *= 3.0
    policy -= 40.0
    ref = rng.standard_normal(M, dtype=np.float32)
    ref *= 3.0
    ref -= 40.0
    offsets = np.arange(0, M + 1, m, dtype=np.int64)
    H = max(1, min(H, N))
    # Records already grouped by annotator, as group_by_annotator leaves them: contiguous
    # blocks of random sizes, none empty.
    cuts = np.sort(rng.choice(np.arange(1, N), H - 1, replace=False)) if H > 1 else []
    aoff = np.concatenate([[0], cuts, [N]]).astype(np.int64)
    weights = rng.uniform(0.0, 1.0, size=(K, N)).astype(np.float32)
    log_w = np.log(rng.dirichlet(np.ones(K)))
    return Layout(N, m, K, H, policy, ref, offsets, aoff, weights, log_w)


def _check_kernels(d: Layout, n: int = 200) -> None:
    """The fused kernels against the float64 reference on the first n records."""
    import emdpo_core as ec
    from emdpo_core.ops import _reference

    n = min(n, d.N)
    sl = slice(0, n * d.m)
    p, r, off = d.policy[:, sl], d.ref[sl], d.offsets[:n + 1]
    aoff = np.unique(np.minimum(d.aoff, n))
    got = ec.e_step(p, r, off, aoff, d.log_w, beta=BETA)
    want = _reference.e_step(p, r, off, aoff, d.log_w, beta=BETA)
    # float32 inputs: per-record math in float32 (tests/conftest.py TOL).
    np.testing.assert_allclose(got.responsibilities, want[0], rtol=1e-4, atol=1e-4)
    for k in range(min(d.K, 2)):
        loss, grad = ec.listwise_dpo_loss_and_grad(p[k], r, off, d.weights[k, :n], beta=BETA)
        loss_ref, grad_ref = _reference.listwise_dpo_loss_and_grad(p[k], r, off,
                                                                   d.weights[k, :n], beta=BETA)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-4)
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4)


class _OnDevice:
    """The layout's arrays as the kernels take them on the chosen device."""

    def __init__(self, d: Layout, env: _Env):
        if env.device == "cuda":
            t = env.torch
            self.policy = t.from_numpy(d.policy).cuda()
            self.ref = t.from_numpy(d.ref).cuda()
            self.offsets = t.from_numpy(d.offsets).cuda()
            self.aoff = t.from_numpy(d.aoff).cuda()
            self.weights = t.from_numpy(d.weights).cuda()
            self.log_w = t.from_numpy(d.log_w).cuda()
        else:
            self.policy, self.ref, self.offsets = d.policy, d.ref, d.offsets
            self.aoff, self.weights, self.log_w = d.aoff, d.weights, d.log_w


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _bytes_e_step(d: Layout, out) -> int:
    return _nbytes(d.policy, d.ref, d.offsets, d.aoff, d.log_w, out.responsibilities,
                   out.annotator_loglik)


def _bytes_loss(d: Layout) -> int:
    # Read policy, ref, weights, offsets once; write the gradient (K, M) once.
    return _nbytes(d.policy, d.ref, d.weights, d.offsets) + d.policy.nbytes


# ----------------------------------------------------------------------------------------
# Cases


def case_e_step(rec: Recorder, env: _Env, d: Layout, repeats: int) -> None:
    import emdpo_core as ec

    dev = _OnDevice(d, env)
    ours = ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w, beta=BETA)
    fns = {"emdpo": lambda: ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w,
                                      beta=BETA)}
    note = ""
    torch = env.torch
    if torch is not None:
        from emdpo_core.bench import torch_baseline as tb

        tdev = env.device
        layout = tb.PaddedLayout(torch.from_numpy(d.offsets), device=tdev)
        rec_ann = torch.repeat_interleave(torch.arange(d.H),
                                          torch.from_numpy(np.diff(d.aoff))).to(tdev)
        tp, tr = torch.from_numpy(d.policy).to(tdev), torch.from_numpy(d.ref).to(tdev)
        tlw = torch.from_numpy(d.log_w).to(tdev)
        g_t, ll_t, _ = tb.e_step(tp, tr, layout, rec_ann, d.H, tlw, BETA)
        # float32 per-record math on both sides, summed over ~N/H records per annotator.
        np.testing.assert_allclose(_to_numpy(g_t), _to_numpy(ours.responsibilities),
                                   rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(ll_t, float(ours.loglik), rtol=1e-4)
        fns["torch_vectorized"] = lambda: tb.e_step(tp, tr, layout, rec_ann, d.H, tlw, BETA)
    else:
        note = "torch not installed: PyTorch baseline skipped"
    t = _rounds(fns, repeats, env.sync)
    base = t.get("torch_vectorized")
    shape = dict(N=d.N, m=d.m, K=d.K, H=d.H, dtype="float32", others=t.others)
    rec.add("main", "e_step", "emdpo", t["emdpo"], baseline="torch_vectorized" if base is not
            None else "", baseline_times=base, work=d.N * d.K, nbytes=_bytes_e_step(d, ours),
            note=note, **shape)
    if base is not None:
        rec.add("main", "e_step", "torch_vectorized", base, work=d.N * d.K, **shape)


def case_loss_grad(rec: Recorder, env: _Env, d: Layout, repeats: int) -> None:
    import emdpo_core as ec

    dev = _OnDevice(d, env)
    loss_k, grad_k = ec.listwise_dpo_loss_and_grad(dev.policy, dev.ref, dev.offsets,
                                                   dev.weights, beta=BETA)
    fns = {"emdpo_kernel": lambda: ec.listwise_dpo_loss_and_grad(
        dev.policy, dev.ref, dev.offsets, dev.weights, beta=BETA)}
    torch = env.torch
    et = None
    note = ""
    if torch is None:
        note = "torch not installed: autograd path and PyTorch baseline skipped"
    else:
        try:
            import emdpo_core.torch as et
        except ImportError as e:     # a build without the torch layer
            note = f"emdpo_core.torch unavailable ({e}): autograd path skipped"
    if et is not None:
        from emdpo_core.bench import torch_baseline as tb

        tdev = env.device
        tp = torch.from_numpy(d.policy).to(tdev)
        tr = torch.from_numpy(d.ref).to(tdev)
        toff = torch.from_numpy(d.offsets).to(tdev)
        tw = torch.from_numpy(d.weights).to(tdev)
        leaf = tp.clone().requires_grad_()
        layout = tb.PaddedLayout(toff, device=tdev)

        def ours():
            leaf.grad = None
            et.listwise_dpo_loss(leaf, tr, toff, tw, beta=BETA, reduction="sum").backward()

        ours()
        loss_t, grad_t = tb.loss_and_grad(tp, tr, layout, tw, BETA)
        # float32 sums of N*K terms: ~1e-6 relative rounding each side; 1e-3 leaves margin.
        np.testing.assert_allclose(float(loss_t), float(loss_k), rtol=1e-3)
        np.testing.assert_allclose(_to_numpy(grad_t), _to_numpy(grad_k), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(_to_numpy(leaf.grad), _to_numpy(grad_k), rtol=1e-5,
                                   atol=1e-7)
        fns["emdpo_autograd"] = ours
        fns["torch_vectorized"] = lambda: tb.loss_and_grad(tp, tr, layout, tw, BETA)
    t = _rounds(fns, repeats, env.sync)
    base = t.get("torch_vectorized")
    shape = dict(N=d.N, m=d.m, K=d.K, H="", dtype="float32", others=t.others)
    nbytes = _bytes_loss(d)
    if "emdpo_autograd" in t:
        rec.add("main", "loss_grad", "emdpo_autograd", t["emdpo_autograd"],
                baseline="torch_vectorized", baseline_times=base, work=d.N * d.K,
                nbytes=nbytes, **shape)
    rec.add("main", "loss_grad", "emdpo_kernel", t["emdpo_kernel"],
            baseline="torch_vectorized" if base is not None else "", baseline_times=base,
            work=d.N * d.K, nbytes=nbytes, note=note or "fused kernel call, no autograd",
            **shape)
    if base is not None:
        rec.add("main", "loss_grad", "torch_vectorized", base, work=d.N * d.K, **shape)


def case_e_step_loop(rec: Recorder, env: _Env, sizes: Sizes, seed: int) -> None:
    import emdpo_core as ec
    from emdpo_core.bench import numpy_baseline as nb

    d = make_layout(sizes.loop_N, sizes.m, sizes.K, max(1, sizes.loop_N // 20), seed + 1)
    ours = ec.e_step(d.policy, d.ref, d.offsets, d.aoff, d.log_w, beta=BETA)
    resp, ll = nb.e_step_python_loop(d.policy, d.ref, d.offsets, d.aoff, d.log_w, beta=BETA)
    np.testing.assert_allclose(resp, ours.responsibilities, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ll, ours.loglik, rtol=1e-4)
    t = _rounds({
        "emdpo": lambda: ec.e_step(d.policy, d.ref, d.offsets, d.aoff, d.log_w, beta=BETA),
        "python_loop": lambda: nb.e_step_python_loop(d.policy, d.ref, d.offsets, d.aoff,
                                                     d.log_w, beta=BETA),
    }, min(5, sizes.repeats), lambda: None)   # the loop is slow: at most 5 rounds
    shape = dict(N=d.N, m=d.m, K=d.K, H=d.H, dtype="float32", device="cpu", others=t.others)
    rec.add("main", "e_step_loop", "emdpo", t["emdpo"], baseline="python_loop",
            baseline_times=t["python_loop"], work=d.N * d.K, nbytes=_bytes_e_step(d, ours),
            note="NumPy inputs on the CPU", **shape)
    rec.add("main", "e_step_loop", "python_loop", t["python_loop"], work=d.N * d.K,
            note="the authors' style: loop over annotators, records, types", **shape)


def case_regret(rec: Recorder, env: _Env, sizes: Sizes, repeats: int, seed: int) -> None:
    import emdpo_core as ec
    from emdpo_core.bench import numpy_baseline as nb
    from emdpo_core.ops import _reference

    for K, S in sizes.regret:
        rng = np.random.default_rng(seed + K)
        counts = rng.multinomial(S - K, np.full(K, 1.0 / K)) + 1   # every policy >= 1 sample
        so = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        lp = rng.normal(-40.0, 3.0, size=(K, S))
        ref = rng.normal(-40.0, 3.0, size=S)
        if env.device == "cuda":
            from emdpo_core.bench import torch_baseline as tb

            torch = env.torch
            x = (torch.from_numpy(lp).cuda(), torch.from_numpy(ref).cuda(),
                 torch.from_numpy(so).cuda())
            base_name, base_fn = "torch_vectorized", tb.regret_matrix
        else:
            x = (lp, ref, so)
            base_name, base_fn = "numpy_vectorized", nb.regret_matrix
        for kind in ("reward", "kl"):
            want = _reference.regret_matrix(lp, ref, so, beta=1.0, kind=kind)
            got = _to_numpy(ec.regret_matrix(*x, beta=1.0, kind=kind))
            base = _to_numpy(base_fn(*x, beta=1.0, kind=kind))
            # float64 means of S/K samples of magnitude ~40: rounding ~1e-12.
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
            np.testing.assert_allclose(base, want, rtol=0, atol=1e-9)
            t = _rounds({
                "emdpo": lambda: ec.regret_matrix(*x, beta=1.0, kind=kind),
                base_name: lambda: base_fn(*x, beta=1.0, kind=kind),
            }, repeats, env.sync)
            nbytes = _nbytes(lp, so) + (ref.nbytes if kind == "reward" else 0) + 8 * K * K
            shape = dict(N=S, K=K, dtype="float64", others=t.others)
            rec.add("main", f"regret_{kind}", "emdpo", t["emdpo"], baseline=base_name,
                    baseline_times=t[base_name], work=S * K, nbytes=nbytes,
                    accuracy=f"{float(np.max(np.abs(got - want))):.2g}",
                    note="N = samples; accuracy = max |R - float64 reference|", **shape)
            rec.add("main", f"regret_{kind}", base_name, t[base_name], work=S * K, **shape)


def _random_kl_regret(rng, K: int) -> np.ndarray:
    R = rng.exponential(1.0, size=(K, K))
    np.fill_diagonal(R, 0.0)
    return R


def case_mmra(rec: Recorder, env: _Env, sizes: Sizes, seed: int) -> None:
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
        t_lp = _rounds({"lp": lambda: ec.mmra(mats[next(it) % len(mats)])}, sizes.lp_repeats,
                       lambda: None)
        t_h = _rounds({"hedge": lambda: ec.mmra(R, solver="hedge")}, sizes.hedge_repeats,
                      lambda: None, warmup=0)
        shape = dict(K=K, dtype="float64", device="cpu")
        rec.add("main", "mmra", "emdpo_lp", t_lp["lp"], baseline="hedge_100k",
                baseline_times=t_h["hedge"], accuracy="0", others=t_lp.others,
                note=f"exact LP ({lp.status}), a new matrix each call", **shape)
        rec.add("main", "mmra", "hedge_100k", t_h["hedge"], accuracy=f"{gap:.3g}",
                others=t_h.others, note="accuracy = (max regret - LP optimum) / max|R|",
                **shape)


def case_em_fit(rec: Recorder, env: _Env, sizes: Sizes, seed: int) -> None:
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
    t = _rounds({
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


def _scaling_point(rec: Recorder, env: _Env, table: str, N: int, m: int, K: int,
                   repeats: int, seed: int) -> None:
    import emdpo_core as ec

    d = make_layout(N, m, K, max(1, N // 20), seed)
    _check_kernels(d, n=50)
    dev = _OnDevice(d, env)
    out = ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w, beta=BETA)
    t = _rounds({
        "e_step": lambda: ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w,
                                    beta=BETA),
        "loss_grad": lambda: ec.listwise_dpo_loss_and_grad(dev.policy, dev.ref, dev.offsets,
                                                           dev.weights, beta=BETA),
    }, repeats, env.sync)
    shape = dict(N=N, m=m, K=K, dtype="float32", others=t.others)
    rec.add(table, "e_step", "emdpo", t["e_step"], H=d.H, work=N * K,
            nbytes=_bytes_e_step(d, out), **shape)
    rec.add(table, "loss_grad", "emdpo_kernel", t["loss_grad"], work=N * K,
            nbytes=_bytes_loss(d), **shape)


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
    torch = _import_torch()
    if args.device == "cuda":
        if torch is None:
            raise ValueError("--device cuda needs PyTorch (pip install torch with CUDA)")
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device "
                             "(torch.cuda.is_available() is False)")
        if not ec.build_info()["cuda"]:
            raise ValueError("--device cuda: this emdpo-core was built without CUDA; reinstall "
                             "with EMDPO_WITH_CUDA=ON (see emdpo_core.build_info())")
    env = _Env(args.device, torch)
    rec = Recorder(env, args.output)
    rec.check_output()
    thread_env = f" ({env.common['thread_env']})" if env.common["thread_env"] else ""
    print(f"emdpo-core {ec.__version__} bench on {env.device_name} ({args.device}); "
          f"{env.common['threads']} threads{thread_env}, cpu_isa {env.common['cpu_isa']}, "
          f"load average {_load_avg()}, commit {env.common['commit']}", flush=True)
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
        _check_kernels(main_data)
    for case in cases:
        print(f"[{case}] {CASES[case]} (load average {_load_avg()})", flush=True)
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
                _scaling_point(rec, env, "N", N, sizes.m, sizes.K, sizes.scale_repeats,
                               args.seed)
        elif case == "scaling_k":
            for K in sizes.scale_K:
                _scaling_point(rec, env, "K", sizes.scale_K_N, sizes.m, K,
                               sizes.scale_repeats, args.seed)
        elif case == "scaling_m":
            for m in sizes.scale_m:
                _scaling_point(rec, env, "m", max(1, sizes.scale_m_slots // m), m, sizes.K,
                               sizes.scale_repeats, args.seed)
        rec.write()       # after every case: a long run that stops keeps what it measured
        if not any(c in ("e_step", "loss_grad") for c in cases[cases.index(case) + 1:]):
            main_data = None  # free it before the scaling tables
    print(f"{rec.written} rows appended to {args.output}")
    print(f"done in {time.perf_counter() - t_start:.0f} s (load average now {_load_avg()})")
    return 0
