"""Forward + backward of the listwise DPO loss through autograd: emdpo_core.torch against a
vectorized PyTorch implementation, measured in the same run.

The baseline is what one writes in plain PyTorch: pad the lists to (N, m_max), a reversed
logcumsumexp for the suffix log-sum-exps, a masked sum over the ranked positions, autograd for
the gradient. It comes in two forms:

  torch_gather  takes the same inputs as emdpo_core (flat log-probabilities + offsets) and pads
                them with a gather through an index built from the offsets (built once, outside
                the timed region, as a trainer with a fixed layout would cache it);
  torch_view    takes lists that already are padded (N, m_max): no gather at all. This is its
                best case (every list full, or data that arrives padded).

emdpo_core runs on the same two inputs: listwise_dpo_loss on the flat layout and
padded_listwise_dpo_loss on the padded one. `emdpo_call` is the fused kernel call without
autograd, to show what the autograd layer costs on top of it.

Correctness is checked before timing: every implementation's loss and gradient against
emdpo_core's, and emdpo_core against the float64 reference on a slice of the records.

Rows are appended to benchmarks/results/bench_torch_loss.csv (device, versions, git commit,
threads, p20/p50/p80 in ms, speedup_p50 = baseline p50 / emdpo p50, speedup_paired = median
over rounds of the per-round ratio; each round times every implementation once, in turn).

    python benchmarks/bench_torch_loss.py                 # N = 1,000,000 lists of 4, float32
    python benchmarks/bench_torch_loss.py --quick         # N = 100,000, fewer repeats
    python benchmarks/bench_torch_loss.py --device cuda --n 4000000
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import subprocess
import time

import numpy as np
import torch

import emdpo_core
import emdpo_core.torch as et
from emdpo_core.ops import _reference, _torch as _torch_dispatch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "results", "bench_torch_loss.csv")
FIELDS = ["timestamp", "device", "device_name", "torch_version", "emdpo_version", "git_commit",
          "threads", "impl", "baseline", "n", "m", "dtype", "beta", "repeats", "p20_ms",
          "p50_ms", "p80_ms", "speedup_p50", "speedup_paired", "gbytes_per_s",
          "copy_gbytes_per_s", "load_avg"]


# ----------------------------------------------------------------------------------------
# The baseline: vectorized PyTorch over padded lists


def padding_index(offsets: torch.Tensor, n_ranked=None):
    """From the offsets: (N, m_max) gather index into the flat slots, the valid-slot mask and
    the ranked-position mask (t < L_i). Built once per layout, outside the timed region."""
    lengths = offsets[1:] - offsets[:-1]
    m_max = int(lengths.max())
    cols = torch.arange(m_max, device=offsets.device)
    valid = cols < lengths[:, None]
    index = torch.where(valid, offsets[:-1, None] + cols, torch.zeros_like(cols))
    L = lengths - 1 if n_ranked is None else n_ranked
    ranked = cols < L[:, None]
    return index, valid, ranked


def torch_padded_loss(policy_pad, ref_pad, valid, ranked, beta):
    """Mean Plackett-Luce DPO loss of padded lists (N, m_max), best first."""
    r = beta * (policy_pad - ref_pad)
    # Padding must not enter the suffix sums; a finite filler keeps logcumsumexp's backward
    # free of (-inf) - (-inf). masked_fill also gives the padding zero gradient.
    r = r.masked_fill(~valid, -1e9)
    lse = torch.logcumsumexp(r.flip(1), dim=1).flip(1)  # lse[:, t] = logsumexp(r[:, t:])
    ll = ((r - lse) * ranked).sum(dim=1)
    return -ll.mean()


# ----------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, repeats, warmup):
    """Milliseconds per call of each fn, one entry per round, over `repeats` rounds.

    Each round calls every fn once, in turn, so that a change of machine load (a shared
    machine) hits all of them alike and the ratios stay fair.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: np.asarray(t) for name, t in times.items()}


def copy_bandwidth(nbytes, device, repeats):
    """GB/s of a plain tensor copy (read + write) of nbytes: the practical memory limit."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats, 2)["copy"]
    return 2 * nbytes / (np.median(t) * 1e-3) / 1e9


def _load_avg():
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of lists (records)")
    ap.add_argument("--m", type=int, default=4, help="responses per list")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per implementation")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--output", default=DEFAULT_OUTPUT, help="CSV to append rows to ('' = none)")
    ap.add_argument("--quick", action="store_true", help="N = 100,000 and 5 repeats (smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.warmup = min(args.n, 100_000), 5, 1
    if args.m < 2 or args.n < 1:
        ap.error("--m must be >= 2 and --n >= 1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    N, m, beta = args.n, args.m, args.beta
    M = N * m

    g = torch.Generator().manual_seed(0)
    policy0 = (torch.randn(M, generator=g, dtype=torch.float64) * 2 - 30).to(dtype).to(device)
    ref = (torch.randn(M, generator=g, dtype=torch.float64) * 2 - 30).to(dtype).to(device)
    offsets = torch.arange(0, M + 1, m, device=device)
    lengths = torch.full((N,), m, device=device)
    index, valid, ranked = padding_index(offsets)
    policy_flat = policy0.clone().requires_grad_()
    policy_pad = policy0.clone().view(N, m).requires_grad_()
    ref_pad = ref.view(N, m)

    def emdpo_flat():
        policy_flat.grad = None
        et.listwise_dpo_loss(policy_flat, ref, offsets, beta=beta).backward()

    def emdpo_padded():
        policy_pad.grad = None
        et.padded_listwise_dpo_loss(policy_pad, ref_pad, lengths, beta=beta).backward()

    def emdpo_call():
        _torch_dispatch.listwise_dpo_loss_and_grad(policy0, ref, offsets, beta=beta,
                                                   reduction="mean", return_tensors=True)

    def torch_gather():
        policy_flat.grad = None
        torch_padded_loss(policy_flat[index], ref[index], valid, ranked, beta).backward()

    def torch_view():
        policy_pad.grad = None
        torch_padded_loss(policy_pad, ref_pad, valid, ranked, beta).backward()

    # Correctness before timing.
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    loss_e = et.listwise_dpo_loss(policy_flat, ref, offsets, beta=beta)
    loss_e.backward()
    grad_e = policy_flat.grad.clone()
    for name, fn, p in [("torch_gather", torch_gather, policy_flat),
                        ("torch_view", torch_view, policy_pad),
                        ("emdpo_padded", emdpo_padded, policy_pad)]:
        fn()
        torch.testing.assert_close(p.grad.reshape(-1), grad_e, **tol, msg=f"{name} gradient")
    loss_t = torch_padded_loss(policy_flat.detach()[index], ref[index], valid, ranked, beta)
    torch.testing.assert_close(loss_e, loss_t, **tol, msg="torch_gather loss")
    n_check = min(N, 2000)  # the reference is a Python loop
    sl = slice(0, n_check * m)
    ref_loss, ref_grad = _reference.listwise_dpo_loss_and_grad(
        policy0[sl].double().cpu().numpy(), ref[sl].double().cpu().numpy(),
        offsets[:n_check + 1].cpu().numpy(), beta=beta, reduction="mean")
    sub = et.listwise_dpo_loss(policy0[sl].double(), ref[sl].double(), offsets[:n_check + 1],
                               beta=beta)
    np.testing.assert_allclose(sub.item(), ref_loss, rtol=1e-9)
    # The full-size gradient is scaled by 1/N, the slice's by 1/n_check.
    np.testing.assert_allclose(grad_e[sl].double().cpu().numpy() * N / n_check, ref_grad,
                               rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=1e-9)
    print(f"correctness: ok (loss {loss_e.item():.6f}; {n_check} records vs float64 reference)")

    # Timing. The 1-minute load average before and after says whether others shared the CPU.
    load_before = _load_avg()
    impls = [("emdpo_flat", emdpo_flat, "torch_gather"),
             ("torch_gather", torch_gather, ""),
             ("emdpo_padded", emdpo_padded, "torch_view"),
             ("torch_view", torch_view, ""),
             ("emdpo_call", emdpo_call, "emdpo_flat")]
    results = time_interleaved({name: fn for name, fn, _ in impls}, device, args.repeats,
                               args.warmup)
    itemsize = policy0.element_size()
    # Minimum traffic of the fused op: read policy and ref, write the gradient (forward), read
    # and write it once more (backward scaling), read the offsets.
    nbytes = 5 * M * itemsize + (N + 1) * 8
    # At least 256 MB so that caches do not flatter the copy.
    copy_gbs = copy_bandwidth(max(M * itemsize, 1 << 28), device, max(3, args.repeats // 2))
    meta = dict(
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=str(device), device_name=device_name(device), torch_version=torch.__version__,
        emdpo_version=emdpo_core.__version__, git_commit=git_commit(),
        threads=f"torch={torch.get_num_threads()},omp={emdpo_core.build_info()['num_threads']}",
        n=N, m=m, dtype=args.dtype, beta=beta, repeats=args.repeats,
        load_avg=f"{load_before}->{_load_avg()}")
    rows = []
    print(f"{meta['device_name']} | torch {torch.__version__} | emdpo {emdpo_core.__version__} | "
          f"{meta['threads']} | N={N:,} m={m} {args.dtype} | load {meta['load_avg']}")
    print(f"{'impl':<14}{'p20 ms':>10}{'p50 ms':>10}{'p80 ms':>10}   speedup vs baseline (p50)")
    for name, _, baseline in impls:
        p20, p50, p80 = np.percentile(results[name], [20, 50, 80])
        speedup = paired = float("nan")
        if baseline:
            speedup = np.median(results[baseline]) / p50
            # Ratio within each round, then the median: robust to load drifting between rounds.
            paired = float(np.median(results[baseline] / results[name]))
        gbs = nbytes / (p50 * 1e-3) / 1e9 if name.startswith("emdpo") else float("nan")
        rows.append(dict(meta, impl=name, baseline=baseline, p20_ms=f"{p20:.3f}",
                         p50_ms=f"{p50:.3f}", p80_ms=f"{p80:.3f}",
                         speedup_p50="" if not baseline else f"{speedup:.2f}",
                         speedup_paired="" if not baseline else f"{paired:.2f}",
                         gbytes_per_s="" if np.isnan(gbs) else f"{gbs:.2f}",
                         copy_gbytes_per_s=f"{copy_gbs:.2f}"))
        extra = f"   {speedup:6.2f}x ({paired:.2f}x paired) vs {baseline}" if baseline else ""
        print(f"{name:<14}{p20:>10.2f}{p50:>10.2f}{p80:>10.2f}{extra}")
    print(f"emdpo_flat moves >= {nbytes / 1e6:.0f} MB: "
          f"{nbytes / (np.median(results['emdpo_flat']) * 1e-3) / 1e9:.1f} GB/s vs "
          f"{copy_gbs:.1f} GB/s for a plain copy")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        new = not os.path.exists(args.output) or os.path.getsize(args.output) == 0
        with open(args.output, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
        print(f"appended {len(rows)} rows to {os.path.relpath(args.output)}")
    return rows


if __name__ == "__main__":
    main()
