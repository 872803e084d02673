"""The benchmark harness that ``emdpo bench`` and the scripts in ``benchmarks/`` share: the
machine and software description of a row, the commit being measured, interleaved timing
rounds with the load other processes put on the machine meanwhile, the copy bandwidth the
kernels are compared with, and CSV rows."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import secrets
import subprocess
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .._io import atomic_write, check_writable

# The columns of `emdpo bench` rows.
FIELDS = ["run_id", "timestamp", "table", "case", "impl", "baseline", "device", "device_name",
          "dtype", "N", "m", "K", "H", "repeats", "p20_ms", "p50_ms", "p80_ms", "speedup_p50",
          "speedup_paired", "ns_per_record_type", "bytes_moved", "GB_per_s",
          "bandwidth_fraction", "copy_GB_per_s", "accuracy", "note", "cpu_isa", "threads",
          "thread_env", "load_avg", "others_cores", "python", "numpy", "torch", "cvxpy",
          "numba", "emdpo_core", "cuda_build", "commit"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return ""


def version_of(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "missing"


def thread_env() -> str:
    """The threading settings from the environment, e.g. "OMP_WAIT_POLICY=passive": they
    change the figures a lot on a shared machine (see benchmarks/README.md)."""
    names = sorted(k for k in os.environ if k.startswith(("OMP_", "GOMP_", "KMP_", "NUMBA_NUM",
                                                          "NUMBA_THREADING", "MKL_NUM")))
    return " ".join(f"{k}={os.environ[k]}" for k in names)


def git_commit() -> str:
    """The commit of the code being measured, looked up once per process: in a git checkout
    (an editable install) the checkout's HEAD, "-dirty" when tracked files other than
    benchmarks/results differ from it; otherwise the commit the installed package was built
    from (written at build time), or "unknown"."""
    global _COMMIT
    if _COMMIT is None:
        _COMMIT = _checkout_commit() or _build_commit() or "unknown"
    return _COMMIT


_COMMIT: Optional[str] = None


def _checkout_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True).stdout.strip()
        # The results CSVs themselves do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results"], cwd=root, check=True,
                               capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty.strip() else "")


def _build_commit() -> Optional[str]:
    try:
        from .._build_commit import GIT_COMMIT
    except ImportError:
        return None
    return GIT_COMMIT if GIT_COMMIT and GIT_COMMIT != "unknown" else None


def device_name(device: str, torch=None) -> str:
    if device == "cuda":
        if torch is None:
            import torch
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


class Env:
    """What every row records about the machine and the software."""

    def __init__(self, device: str, torch):
        import emdpo_core as ec

        info = ec.build_info()
        self.device = device
        self.torch = torch
        self.device_name = device_name(device, torch)
        self.sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (
            lambda: None)
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
            "threads": threads, "thread_env": thread_env(),
            "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__ if torch else "missing",
            "cvxpy": version_of("cvxpy"), "numba": version_of("numba"),
            "emdpo_core": ec.__version__, "cuda_build": str(info["cuda"]),
            "commit": git_commit(),
        }
        self.copy_bw = float("nan")


def cpu_ticks() -> Optional[Tuple[int, int]]:
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


def rounds(fns: Dict[str, Callable[[], object]], repeats: int, sync, warmup: int = 1):
    """Seconds per call of each fn over `repeats` interleaved rounds, after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    ticks0, t_start = cpu_ticks(), time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    out = Timings((name, np.asarray(t)) for name, t in times.items())
    ticks1, elapsed = cpu_ticks(), time.perf_counter() - t_start
    if ticks0 and ticks1 and elapsed > 0.05:   # /proc counts in ticks of 10 ms
        busy, mine = ticks1[0] - ticks0[0], ticks1[1] - ticks0[1]
        out.others = max(0.0, (busy - mine) / os.sysconf("SC_CLK_TCK") / elapsed)
    return out


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1, sync=None):
    """(p20, p50, p80) seconds of ``repeats`` calls of fn after ``warmup`` calls, each call
    followed by ``sync`` (e.g. torch.cuda.synchronize) when given."""
    t = rounds({"fn": fn}, repeats, sync or (lambda: None), warmup)["fn"]
    return tuple(float(x) for x in np.percentile(t, [20, 50, 80]))


def append_rows(path, rows: List[dict]) -> None:
    """Append rows (dicts with the same keys) to a CSV file, writing the header when new."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)


def copy_bandwidth(device, nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes per second of a plain copy of nbytes (read + write counted) on ``device`` ("cpu",
    "cuda" or an :class:`Env`): the practical memory-bandwidth limit kernels are compared
    with."""
    if isinstance(device, Env):
        device = device.device
    if device == "cuda":
        import torch

        src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
        dst = torch.empty_like(src)
        t = rounds({"copy": lambda: dst.copy_(src)}, repeats, torch.cuda.synchronize)["copy"]
    else:
        src = np.ones(nbytes // 8)
        dst = np.empty_like(src)
        t = rounds({"copy": lambda: np.copyto(dst, src)}, repeats, lambda: None)["copy"]
    return 2 * nbytes / float(np.median(t))


def base_row(device: str) -> dict:
    """The columns every script row starts with: date, commit, device, threads, versions."""
    import emdpo_core as ec

    torch = import_torch()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(device, torch),
        "threads": ec.build_info()["num_threads"],
        "emdpo_core": ec.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else "",
    }


def nbytes(*arrays) -> int:
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

    def __init__(self, env: Env, path: str):
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
            load_avg=load_avg(), others_cores="" if others is None else f"{others:.2f}")
        if device:     # a CPU-only case in a --device cuda run
            row["device"] = device
            if device == "cpu":
                row["device_name"] = device_name("cpu")
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
