"""Small-batch cost of the DPO loss: forward + backward at B = 8 pairs (and lists of 3),
emdpo_core.torch against TRL's plain formula, measured in the same run.

A trainer calls the loss once per micro-batch, on a handful of pairs: what matters there is
the fixed cost per call (argument checks, dispatch, autograd), not throughput. The baseline is
the expression TRL's DPOTrainer evaluates for ``loss_type="sigmoid"``:

    -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

with its backward. Target: emdpo_core within 1.5x of it. Rows are appended to
benchmarks/results/bench_small_batch_loss.csv (p20/p50/p80 in microseconds, ratio of medians,
and the median of per-round ratios; rounds alternate the implementations).

    python benchmarks/bench_small_batch_loss.py            # B = 8, float32, CPU
    python benchmarks/bench_small_batch_loss.py --device cuda --batch 8 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import append_rows, base_row  # noqa: E402

import emdpo_core.torch as et  # noqa: E402

DEFAULT_OUTPUT = os.path.join(HERE, "results", "bench_small_batch_loss.csv")
BETA = 0.1


def cases(B, device, dtype, rng):
    def t(x, grad=False):
        return torch.tensor(x, dtype=dtype, device=device, requires_grad=grad)

    pc, pr = t(rng.normal(-40, 3, B), True), t(rng.normal(-40, 3, B), True)
    rc, rr = t(rng.normal(-40, 3, B)), t(rng.normal(-40, 3, B))
    lists = t(rng.normal(-40, 3, 3 * B), True)
    lref = t(rng.normal(-40, 3, 3 * B))
    offsets = torch.arange(0, 3 * B + 1, 3, device=device)

    def trl():
        loss = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        return loss

    def pairwise():
        loss = et.pairwise_dpo_loss(pc, pr, rc, rr, beta=BETA)
        loss.backward()
        return loss

    def listwise():
        loss = et.listwise_dpo_loss(lists, lref, offsets, beta=BETA)
        loss.backward()
        return loss

    # Correctness first: the same loss and gradients as the baseline.
    for p in (pc, pr):
        p.grad = None
    want = trl()
    gw = (pc.grad.clone(), pr.grad.clone())
    for p in (pc, pr):
        p.grad = None
    got = pairwise()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((pc.grad, pr.grad), gw, rtol=1e-5, atol=1e-7)
    return {"trl_formula": trl, "pairwise_dpo_loss": pairwise,
            "listwise_dpo_loss (lists of 3)": listwise}


def measure(fns, rounds, inner, sync):
    times = {name: [] for name in fns}
    for fn in fns.values():            # warm-up
        for _ in range(inner):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / inner)
    return {k: np.asarray(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--inner", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    rows = []
    for B in a.batch:
        fns = cases(B, a.device, dtype, np.random.default_rng(B))
        times = measure(fns, a.rounds, a.inner, sync)
        base = times["trl_formula"]
        print(f"B={B} {a.device} {a.dtype} (forward + backward, per call):")
        for name, t in times.items():
            p20, p50, p80 = np.percentile(t, [20, 50, 80]) * 1e6
            ratio = p50 / (np.median(base) * 1e6)
            paired = float(np.median(t / base))
            print(f"  {name:32s} p50 {p50:7.1f} us  (p20 {p20:6.1f}, p80 {p80:6.1f})  "
                  f"x{ratio:4.2f} of TRL's formula (paired x{paired:4.2f})")
            row = base_row(a.device)
            row.update(case=name, batch=B, dtype=a.dtype, p20_us=round(p20, 2),
                       p50_us=round(p50, 2), p80_us=round(p80, 2), ratio_p50=round(ratio, 3),
                       ratio_paired=round(paired, 3), load_avg=round(os.getloadavg()[0], 2))
            rows.append(row)
    append_rows(__import__("pathlib").Path(a.output), rows)
    print(f"rows appended to {a.output}")


if __name__ == "__main__":
    main()
