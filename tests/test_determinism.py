"""Bitwise-identical results for any OpenMP thread count (separate processes)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import hashlib, numpy as np, emdpo_core as ec
rng = np.random.default_rng(1234)
N = 30000
m = rng.integers(2, 7, size=N)
offsets = np.concatenate([[0], np.cumsum(m)])
M, K = int(offsets[-1]), 5
p = rng.normal(-30, 2, (K, M)).astype(np.float32)
r = rng.normal(-30, 2, M).astype(np.float32)
n_ranked = np.array([rng.integers(1, mi) for mi in m])
lw = np.log(rng.dirichlet(np.ones(K)))
h = hashlib.sha256()
for aoff in (np.array([0, N]),                                   # one annotator owns all
             np.concatenate([[0], np.sort(rng.choice(np.arange(1, N), 3000, replace=False)), [N]]),
             np.arange(N + 1)):                                 # one record each
    res = ec.e_step(p, r, offsets, aoff, lw, beta=2.0, n_ranked=n_ranked,
                    record_weights=rng.uniform(0, 1, N).astype(np.float32))
    h.update(res.responsibilities.tobytes()); h.update(res.annotator_loglik.tobytes())
    h.update(np.float64(res.loglik).tobytes())
for red in ("sum", "mean", "weighted_mean"):
    loss, grad = ec.listwise_dpo_loss_and_grad(p, r, offsets, rng.uniform(0, 1, (K, N)), beta=2.0,
                                               n_ranked=n_ranked, reduction=red)
    h.update(np.float64(loss).tobytes()); h.update(grad.tobytes())
h.update(ec.listwise_loglik(p, r, offsets, beta=2.0, n_ranked=n_ranked).tobytes())
print(ec.build_info()["num_threads"], h.hexdigest())
"""


def run_with_threads(n):
    env = dict(os.environ, OMP_NUM_THREADS=str(n))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         check=True)
    threads, digest = out.stdout.split()
    return int(threads), digest


def test_bitwise_identical_across_thread_counts():
    t1, d1 = run_with_threads(1)
    t2, d2 = run_with_threads(2)
    t4, d4 = run_with_threads(4)  # more threads than cores: still the same association
    assert (t1, t2, t4) == (1, 2, 4)
    assert d1 == d2 == d4
