"""What the ``emdpo bench`` cases run on: the sizes of a run (full and ``--quick``) and
the random ranked lists of the kernel cases, with the check of the fused kernels against the
float64 reference that runs before anything is timed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Tuple

import numpy as np

from .harness import Env, nbytes

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


def check_kernels(d: Layout, n: int = 200) -> None:
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


class OnDevice:
    """The layout's arrays as the kernels take them on the chosen device."""

    def __init__(self, d: Layout, env: Env):
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


def to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def bytes_e_step(d: Layout, out) -> int:
    return nbytes(d.policy, d.ref, d.offsets, d.aoff, d.log_w, out.responsibilities,
                   out.annotator_loglik)


def bytes_loss(d: Layout) -> int:
    # Read policy, ref, weights, offsets once; write the gradient (K, M) once.
    return nbytes(d.policy, d.ref, d.weights, d.offsets) + d.policy.nbytes
