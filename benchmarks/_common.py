"""Shared benchmark plumbing: timing percentiles, machine description, CSV rows."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import subprocess
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The checkout's commit, "-dirty" when tracked files outside results/ differ from it
    (the benchmarks measure the working tree), or "unknown" without git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, check=True,
                             capture_output=True, text=True).stdout.strip()
        # The results CSVs themselves do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!results"], cwd=here, check=True, capture_output=True,
                               text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    from emdpo_core.bench.cases import _cpu_name

    return _cpu_name()


def device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def timeit(fn, repeats: int, warmup: int = 1, sync=None):
    """Run fn warmup times, then time `repeats` runs; returns (p20, p50, p80) in seconds."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return tuple(float(x) for x in np.percentile(times, [20, 50, 80]))


def copy_bandwidth(device: str = "cpu", nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: a large copy, counting bytes read + written."""
    if device == "cuda":
        import torch
        a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
        b = torch.empty_like(a)
        _, p50, _ = timeit(lambda: b.copy_(a), repeats, sync=torch.cuda.synchronize)
    else:
        a = np.random.default_rng(0).random(nbytes // 8)
        b = np.empty_like(a)
        _, p50, _ = timeit(lambda: np.copyto(b, a), repeats)
    return 2 * nbytes / p50


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fields = list(rows[0].keys())
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def base_row(device: str) -> dict:
    import emdpo_core as ec
    row = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(device),
        "threads": ec.build_info()["num_threads"],
        "emdpo_core": ec.__version__,
        "numpy": np.__version__,
    }
    try:
        import torch
        row["torch"] = torch.__version__
    except ImportError:
        row["torch"] = ""
    return row
