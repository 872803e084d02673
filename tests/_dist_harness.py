"""Run functions on P gloo processes (torch.multiprocessing spawn) and collect their results.

``run_group(P, jobs)`` starts P processes once, joins them into a gloo group on 127.0.0.1 and
a free port, and runs every job ``(name, function, kwargs)`` in each of them, in order;
``function(comm_rank, world_size, **kwargs)`` returns a picklable value (or raises: the
exception's type and message are returned instead, so error paths can be asserted). Starting
processes is the expensive part (each imports torch), so a test module starts one group per
P and runs all its scenarios in it. Every wait has a deadline: a hung collective fails the
test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback

# A collective that does not complete in this time raises in the workers (gloo timeout);
# the parent gives up on the whole group after GROUP_DEADLINE seconds. The machine is
# shared and loaded; starting 3 processes that import torch took up to 50 s under load.
COLLECTIVE_TIMEOUT_S = 120
GROUP_DEADLINE = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, jobs, outdir, env):
    os.environ.update(env)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch.distributed as dist

    results = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        for name, fn, kwargs in jobs:
            try:
                results[name] = ("ok", fn(rank, world_size, **kwargs))
            except Exception as e:   # noqa: BLE001 -- reported to the parent test
                results[name] = ("error", type(e).__name__, str(e), traceback.format_exc())
        dist.destroy_process_group()
    finally:
        tmp = os.path.join(outdir, f"rank{rank}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(results, f)
        os.replace(tmp, os.path.join(outdir, f"rank{rank}.pkl"))


def run_group(world_size, jobs, env=None, deadline=GROUP_DEADLINE, allow_exit=False):
    """[results of rank 0, results of rank 1, ...], each {job name: ("ok", value) or
    ("error", type name, message, traceback)}; None for a rank that exited without results
    (allowed only with ``allow_exit``: a test that kills a rank on purpose)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    outdir = tempfile.mkdtemp(prefix="emdpo-dist-")
    env = dict(env or {})
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("NUMBA_NUM_THREADS", "1")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, jobs, outdir, env),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    try:
        for p in procs:
            p.join(timeout=max(1.0, deadline - (time.monotonic() - t0)))
            if p.is_alive():
                raise TimeoutError(f"distributed test group of {world_size} did not finish in "
                                   f"{deadline} s")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    out = []
    for r in range(world_size):
        path = os.path.join(outdir, f"rank{r}.pkl")
        if not os.path.exists(path):
            if not allow_exit:
                raise AssertionError(f"rank {r} exited with code {procs[r].exitcode} and no "
                                     f"results")
            out.append(None)
            continue
        with open(path, "rb") as f:
            out.append(pickle.load(f))
    return out


def value(results, name):
    """The value of job ``name`` on one rank, re-raising a worker's error with its traceback."""
    res = results[name]
    if res[0] != "ok":
        raise AssertionError(f"job {name} failed in the worker: {res[1]}: {res[2]}\n{res[3]}")
    return res[1]
