"""Bitwise-identical results for any OpenMP thread count (separate processes)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import SUBPROCESS_CWD

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
print(ec.build_info()["num_threads"], ec.build_info()["cpu_isa"], h.hexdigest())
"""


def run(threads, isa=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("EMDPO_CPU_ISA", None)
    if isa:
        env["EMDPO_CPU_ISA"] = isa
    out = subprocess.run(cwd=SUBPROCESS_CWD, args=[sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         check=True)
    n, used_isa, digest = out.stdout.split()
    return int(n), used_isa, digest


def test_bitwise_identical_across_thread_counts():
    t1, _, d1 = run(1)
    t2, _, d2 = run(2)
    t4, _, d4 = run(4)  # more threads than cores: still the same association
    assert (t1, t2, t4) == (1, 2, 4)
    assert d1 == d2 == d4


def test_bitwise_identical_across_instruction_sets():
    """The baseline, AVX2 and AVX-512 builds of the record loops (whichever this machine
    has) use different lane widths but the same IEEE operations per record."""
    results = {run(2, isa)[1:] for isa in ("baseline", "avx2", "avx512")}
    isas = {isa for isa, _ in results}
    digests = {digest for _, digest in results}
    assert "baseline" in isas
    assert len(digests) == 1, results
