"""Scaling of a distributed PlackettLuceMixture fit on torch.distributed (gloo, CPU).

For P = 1, 2, 4 processes on this machine (each process one thread: OMP_NUM_THREADS =
NUMBA_NUM_THREADS = 1), launched with multiprocessing spawn + init_process_group (what
torchrun does, without its launcher):
  * strong scaling: the same data (H annotators in all) split over P ranks;
  * weak scaling: H / 2 annotators per rank (the data grows with P);
  * both shardings: "annotator" (each annotator on one rank, by shard_of) and "record"
    (records dealt round-robin, so most annotators straddle ranks);
  * per EM iteration: wall time p20/p50/p80 (between successive iterations of the fit),
    collectives, payload bytes and wire bytes (ring model) per rank, measured by the
    communicator's counters;
  * the ordered (deterministic) sum against ``all_reduce`` for buffers of K, 64 K and the
    Newton statistics' size.
The P = 1 rows are the baseline: the one-process fit (no process group, no communication);
``ratio_to_baseline`` = time per iteration / the baseline's (strong: ideal 1/P; weak: ideal 1).

Before timing, the P-rank fit is checked against the one-process fit of the union (weights to
1e-10): a wrong distributed fit is not timed.

Rows are appended to benchmarks/results/bench_distributed.csv with the machine, load average,
versions and commit. On a shared 2-core machine, P = 4 oversubscribes the cores (4 busy
processes on 2 cores): its times measure that, not the algorithm.

    python benchmarks/bench_distributed.py            # H = 40,000 annotators (about 2 min)
    python benchmarks/bench_distributed.py --quick    # H = 4,000 (about 40 s)
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import pickle
import time
from pathlib import Path

import numpy as np

# One thread per process (set before anything loads OpenMP or Numba): P processes use P cores.
os.environ["OMP_NUM_THREADS"] = os.environ["NUMBA_NUM_THREADS"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, git_commit  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "results" / "bench_distributed.csv"
FIELDS = ["timestamp", "bench", "scaling", "sharding", "world_size", "H", "N", "n_items", "K",
          "iterations", "p20_ms", "p50_ms", "p80_ms", "baseline_ms", "ratio_to_baseline",
          "collectives_per_iter", "payload_bytes_per_iter", "wire_bytes_per_iter", "note",
          "device", "cpu_count", "load_avg_1m", "python", "numpy", "torch", "emdpo_core",
          "commit"]
K, N_ITEMS, RECORDS, ITERS = 4, 20, 2, 12


def make_data(H, seed=0):
    import emdpo_core as ec

    rng = np.random.default_rng(seed)
    truth = ec.PlackettLuceMixture.from_parameters(rng.normal(0, 1.5, size=(K, N_ITEMS)),
                                                   np.full(K, 1.0 / K))
    data, _ = truth.sample(H, records_per_annotator=RECORDS, candidate_size=6,
                           random_state=seed)
    return data


def model():
    import emdpo_core as ec

    # tol=0 and a fixed max_iter: every run does the same number of iterations.
    return ec.PlackettLuceMixture(K, max_iter=ITERS, tol=0.0, init_params="random",
                                  random_state=0)


def local_shard(data, rank, P, sharding):
    from emdpo_core import distributed

    if sharding == "annotator":
        return distributed.shard(data, rank=rank, world_size=P)
    # Records dealt round-robin: an annotator's records end up on several ranks.
    return distributed.take_records(data, np.arange(rank, data.n_records, P))


def fit_timed(m, data, process_group=None):
    """(ms per EM iteration after the first, collectives, payload and wire bytes per rank per
    iteration) of one fit, from the fit's callback and its communicator's counters."""
    stamps, counts = [], []

    def callback(info):
        c = m._shards.comm
        stamps.append(time.perf_counter())
        counts.append((c.calls, c.payload_bytes, c.wire_bytes))

    m.fit(data, callback=callback, process_group=process_group)
    per_iter = np.diff(np.asarray(counts, dtype=np.float64), axis=0).mean(axis=0)
    return np.diff(stamps) * 1e3, per_iter


def worker(rank, P, port, cases, outpath):
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from emdpo_core import distributed

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P)
    out = []
    for scaling, sharding, H in cases:
        local = local_shard(make_data(H), rank, P, sharding)
        m = model()
        m.fit(local)                                  # warm-up (Numba, caches)
        m = model()
        t, (calls, payload, wire) = fit_timed(m, local)
        out.append(dict(scaling=scaling, sharding=sharding, H=H, N=local.n_records,
                        times=t, calls=calls, payload=payload, wire=wire,
                        weights=m.weights_))
    # Ordered sum against all_reduce.
    comm = distributed.resolve_comm(None)
    for n in (K, 64 * K, K * N_ITEMS * (N_ITEMS + 1) + K):
        x = np.random.default_rng(rank).normal(size=n)
        for how in ("ordered", "all_reduce"):
            fn = comm.sum if how == "ordered" else comm.sum_unordered
            for _ in range(3):
                fn(x)
            ts = []
            for _ in range(30):
                t0 = time.perf_counter()
                fn(x)
                ts.append((time.perf_counter() - t0) * 1e3)
            out.append(dict(scaling="reduction", sharding=how, H=n, N=0, times=np.array(ts),
                            calls=0, payload=8 * n, wire=0, weights=None))
    dist.destroy_process_group()
    if rank == 0:
        with open(outpath, "wb") as f:
            pickle.dump(out, f)


def run_group(P, cases):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outpath = tempfile.mktemp(suffix=".pkl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, P, port, cases, outpath)) for r in range(P)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(900)
        if p.exitcode != 0:
            raise RuntimeError(f"a rank of the group of {P} failed (exit code {p.exitcode})")
    with open(outpath, "rb") as f:
        return pickle.load(f)


def environment():
    import torch

    import emdpo_core as ec

    return {"device": f"cpu: {cpu_name()}", "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "emdpo_core": ec.__version__,
            "commit": git_commit()}


def main(argv=None):
    import warnings

    from emdpo_core import ConvergenceWarning

    # tol=0 with a fixed number of iterations: not converging is the point.
    warnings.simplefilter("ignore", ConvergenceWarning)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="H = 4,000 annotators")
    ap.add_argument("--H", type=int, default=None, help="annotators of the strong-scaling data")
    ap.add_argument("--world-sizes", default="1,2,4")
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    H = args.H or (4_000 if args.quick else 40_000)
    sizes = [int(x) for x in args.world_sizes.split(",")]
    import emdpo_core as ec

    env = environment()
    # The baseline: one process, no group.
    data = make_data(H)
    m = model()
    m.fit(data)
    base = np.percentile(fit_timed(model(), data)[0], [20, 50, 80])
    base_weights = model().fit(data).weights_
    rows = [dict(scaling="baseline", sharding="none", world_size=1, H=H, N=data.n_records,
                 p=base, base=base[1], calls=0, payload=0, wire=0)]
    print(f"one process, H={H}: {base[1]:.1f} ms per EM iteration (p50)")
    weak_base = None
    for P in sizes:
        if P == 1:
            continue
        cases = [("strong", "annotator", H), ("strong", "record", H),
                 ("weak", "annotator", H // 2 * P)]
        t0 = time.perf_counter()
        res = run_group(P, cases)
        print(f"P={P}: group ran in {time.perf_counter() - t0:.0f} s")
        for r in res:
            if r["scaling"] == "reduction":
                p = np.percentile(r["times"], [20, 50, 80])
                rows.append(dict(scaling="reduction", sharding=r["sharding"], world_size=P,
                                 H=r["H"], N=0, p=p, base=None, calls=1,
                                 payload=r["payload"], wire=0))
                continue
            if r["scaling"] == "strong":
                np.testing.assert_allclose(r["weights"], base_weights, rtol=1e-10)
            p = np.percentile(r["times"], [20, 50, 80])
            if r["scaling"] == "weak":
                if weak_base is None:
                    wd = make_data(H // 2)
                    model().fit(wd)
                    weak_base = np.percentile(fit_timed(model(), wd)[0], [20, 50, 80])[1]
                    rows.append(dict(scaling="weak", sharding="none", world_size=1, H=H // 2,
                                     N=wd.n_records, p=np.array([weak_base] * 3),
                                     base=weak_base, calls=0, payload=0, wire=0))
            b = base[1] if r["scaling"] == "strong" else weak_base
            rows.append(dict(scaling=r["scaling"], sharding=r["sharding"], world_size=P,
                             H=r["H"], N=r["N"], p=p, base=b, calls=r["calls"],
                             payload=r["payload"], wire=r["wire"]))
            print(f"  {r['scaling']:>6} {r['sharding']:>9}: {p[1]:8.1f} ms/iter (x{p[1] / b:.2f} "
                  f"of one process), {r['calls']:.0f} collectives and {r['payload']:,.0f} B "
                  f"payload per iteration and rank")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            p = r["p"]
            w.writerow({"timestamp": stamp, "bench": "quick" if args.quick else "full",
                        "scaling": r["scaling"], "sharding": r["sharding"],
                        "world_size": r["world_size"], "H": r["H"], "N": r["N"],
                        "n_items": N_ITEMS, "K": K, "iterations": ITERS,
                        "p20_ms": round(p[0], 3), "p50_ms": round(p[1], 3),
                        "p80_ms": round(p[2], 3),
                        "baseline_ms": "" if r["base"] is None else round(r["base"], 3),
                        "ratio_to_baseline": "" if r["base"] is None else
                        round(p[1] / r["base"], 3),
                        "collectives_per_iter": round(r["calls"], 2),
                        "payload_bytes_per_iter": round(r["payload"]),
                        "wire_bytes_per_iter": round(r["wire"]),
                        "note": ("2-core machine shared with other jobs; one thread per "
                                 "process " + args.note).strip(), **env})
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
