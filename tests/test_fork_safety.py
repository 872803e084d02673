"""Kernels and fits in a child made by fork() after the parent ran OpenMP parallel regions.

GNU OpenMP's worker threads do not survive fork(); a child that opened a parallel region
would wait for them forever. The kernels detect such a child and run serially there, with the
same reduction order, so the child's results are bitwise the parent's. Each scenario runs in
a fresh interpreter with a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import SUBPROCESS_CWD

COMMON = r"""
import hashlib, multiprocessing as mp, numpy as np, emdpo_core as ec
from emdpo_core import _core

def inputs():
    rng = np.random.default_rng(7)
    N, K = 6000, 3                         # > 2048 records: the kernels' parallel path
    m = rng.integers(2, 6, N)
    off = np.concatenate([[0], np.cumsum(m)])
    M = int(off[-1])
    p = rng.normal(-30, 2, (K, M)); r = rng.normal(-30, 2, M)
    nr = np.array([rng.integers(1, mi) for mi in m])
    ao = np.concatenate([[0], np.sort(rng.choice(np.arange(1, N), 500, replace=False)), [N]])
    S = 100_000                            # K * S >= 2^18: regret_matrix's parallel path
    so = np.array([0, 30_000, 70_000, S])
    lp = rng.normal(-5, 1, (K, S)); lr = rng.normal(-5, 1, S)
    return p, r, off, nr, ao, lp, lr, so

def digest(_=None):
    p, r, off, nr, ao, lp, lr, so = inputs()
    h = hashlib.sha256()
    h.update(ec.listwise_loglik(p, r, off, beta=1.3, n_ranked=nr).tobytes())
    e = ec.e_step(p, r, off, ao, np.log([0.2, 0.3, 0.5]), beta=1.3, n_ranked=nr)
    h.update(e.responsibilities.tobytes()); h.update(np.float64(e.loglik).tobytes())
    loss, g = ec.listwise_dpo_loss_and_grad(p.astype(np.float32), r.astype(np.float32), off,
                                            beta=1.3, n_ranked=nr, reduction="mean")
    h.update(np.float64(loss).tobytes()); h.update(g.tobytes())
    h.update(ec.regret_matrix(lp, lr, so, beta=0.5).tobytes())
    return h.hexdigest(), _core.num_threads()
"""

KERNELS = COMMON + r"""
def in_forked_process(target, timeout):
    # What target(queue), run in a forked process, put on the queue.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue,))
    proc.start()
    result = queue.get(timeout=timeout)
    proc.join(timeout=60)
    return result

def put_digest(queue):
    queue.put(digest())

def fork_grandchild(queue):
    # A child of a forked child: its parent never ran a parallel region, its grandparent did.
    queue.put(in_forked_process(put_digest, 60))

if __name__ == "__main__":
    parent, threads = digest()
    assert threads == 2, threads
    with mp.get_context("fork").Pool(2) as pool:
        children = pool.map_async(digest, range(3)).get(timeout=60)
    children.append(in_forked_process(fork_grandchild, 90))
    # Serial in every forked descendant, and bitwise the parent's results.
    assert all(c == (parent, 1) for c in children), (parent, children)
    assert digest() == (parent, 2)         # the parent keeps its threads
    print("ok")
"""

BEFORE_THREADS = COMMON + r"""
if __name__ == "__main__":
    # Forked before any parallel region ran: the child may still use its threads.
    with mp.get_context("fork").Pool(1) as pool:
        child = pool.map_async(digest, [0]).get(timeout=60)[0]
    assert child[1] == 2, child
    assert digest()[0] == child[0]
    print("ok")
"""


FIT = r"""
import multiprocessing as mp, numpy as np, emdpo_core as ec

truth = ec.PlackettLuceMixture.from_parameters(
    [[3.0, 2, 1, 0, -1, -2], [-2.0, -1, 0, 1, 2, 3]], [0.5, 0.5])
data, _ = truth.sample(3000, random_state=0)   # > 2048 records: the E-step's parallel path

def fit(_=None):
    m = ec.PlackettLuceMixture(2, random_state=0, max_iter=15, tol=0.0).fit(data)
    return m.weights_.tobytes() + m.log_worths_.tobytes() + np.float64(m.lower_bound_).tobytes()

if __name__ == "__main__":
    parent = fit()                               # Numba's and the kernels' threads start here
    with mp.get_context("fork").Pool(2) as pool:
        children = pool.map_async(fit, range(2)).get(timeout=120)
    assert all(c == parent for c in children), "a child's fit differs from the parent's"
    print("ok")
"""


def _run(script, threads=2):
    import os
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", script], cwd=SUBPROCESS_CWD, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_kernels_run_in_children_forked_after_parallel_regions():
    _run(KERNELS)


def test_plackett_luce_fit_in_forked_children():
    """The tabular EM (C++ E-step, Numba M-step) in children forked after the parent's fit."""
    _run(FIT)


def test_child_forked_before_any_parallel_region_keeps_threads():
    _run(BEFORE_THREADS)
