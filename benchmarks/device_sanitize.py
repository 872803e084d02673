"""A small run of every CUDA kernel for compute-sanitizer (memcheck, racecheck).

benchmarks/device_check.sh runs it as `compute-sanitizer --tool memcheck python
benchmarks/device_sanitize.py` (and racecheck). The layouts aim at the kernels' edges:
annotators of 255, 256 and 257 records around the 256-record tiles, one crossing several
tiles, empty annotators first, between and last, lists from 2 to 300 slots (the register
paths and the loop), K = 3 and 8 (annotators finished in the tile kernel) and K = 9 (the
finish kernel), float32 and float64, with record_ll, annotator weights and type totals.
Every result is checked against the CPU kernels, so the run also fails on wrong values.
--dry-run runs the same calls on CPU tensors (checks the script anywhere).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import emdpo_core as ec


def main(dry=False):
    dev = torch.device("cpu" if dry else "cuda")
    rng = np.random.default_rng(16)
    sizes = [0, 255, 256, 257, 0, 700, 3, 1, 0, 40, 300, 0]
    N = sum(sizes)
    ao = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    m = rng.integers(2, 9, N)
    long = rng.random(N) < 0.05  # some lists past the register paths, up to 300 slots
    m[long] = rng.integers(9, 301, int(long.sum()))
    m[::97] = 300
    off = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    M = int(off[-1])
    nr = np.array([rng.integers(1, mi) for mi in m], dtype=np.int64)
    for dtype in (np.float32, np.float64):
        for K in (3, 8, 9):
            base = rng.normal(-40, 3, M)
            p = (base + 0.3 * rng.normal(size=(K, M))).astype(dtype)
            r = (base + 0.3 * rng.normal(size=M)).astype(dtype)
            lw = np.log(rng.dirichlet(np.ones(K)))
            c = rng.uniform(0, 2, N).astype(dtype)
            t = lambda x: torch.as_tensor(x, device=dev)  # noqa: E731
            got = ec.e_step(t(p), t(r), t(off), t(ao), lw, beta=0.7, n_ranked=t(nr),
                            record_weights=t(c), return_record_loglik=True)
            want = ec.e_step(p, r, off, ao, lw, beta=0.7, n_ranked=nr, record_weights=c,
                             return_record_loglik=True)
            tol = 1e-4 if dtype == np.float32 else 1e-10
            for name in ("responsibilities", "annotator_loglik", "record_loglik"):
                a = getattr(got, name).cpu().numpy()
                b = getattr(want, name)
                err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)
                assert err <= tol, (dtype.__name__, K, name, err)
            assert abs(got.loglik - want.loglik) <= tol * abs(want.loglik), (dtype, K)
            w = rng.uniform(0, 1, (K, N)).astype(dtype)
            lg, gg = ec.listwise_dpo_loss_and_grad(t(p), t(r), t(off), t(w), beta=0.7,
                                                    n_ranked=t(nr))
            lc, gc = ec.listwise_dpo_loss_and_grad(p, r, off, w, beta=0.7, n_ranked=nr)
            assert abs(float(lg) - lc) <= tol * abs(lc), (dtype, K, "loss")
            err = np.linalg.norm(gg.cpu().numpy() - gc) / np.linalg.norm(gc)
            assert err <= tol, (dtype, K, "grad", err)
            print(f"{np.dtype(dtype).name} K={K}: e_step, loss+grad ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(dry="--dry-run" in sys.argv))
