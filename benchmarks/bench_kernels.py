"""Benchmark the fused kernels (E-step, loss+gradient) against vectorized PyTorch.

Default size: N = 1,000,000 lists of 4 responses, K = 8 types, float32 (the target size). Prints
p20/p50/p80, the speed-up over PyTorch measured in the same run, ns per (record x type), and
the fraction of the measured copy bandwidth reached; appends rows to
benchmarks/results/bench_kernels.csv.

    python benchmarks/bench_kernels.py                 # full size, CPU
    python benchmarks/bench_kernels.py --quick         # N = 100,000
    python benchmarks/bench_kernels.py --device cuda --n 10000000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_reference as tref  # noqa: E402

import emdpo_core as ec  # noqa: E402
from emdpo_core.bench import harness, make_layout  # noqa: E402
from emdpo_core.bench.routines import reference as _reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_data(N, m, K, n_annotators, seed=0):
    """The suite's random workload (emdpo_core.bench.make_layout: float32 drawn in place, no
    float64 temporaries; records grouped by annotator) as a dict of arrays; the single-type
    loss takes the first type's row of M-step weights."""
    d = make_layout(N, m, K, n_annotators, seed)
    return dict(policy=d.policy, ref=d.ref, offsets=d.offsets, aoff=d.aoff,
                weights=np.ascontiguousarray(d.weights[0]), log_w=d.log_w)


def check_against_reference(d, beta):
    """Correctness before timing: a slice of the data against the float64 reference."""
    n = 300
    m = d["offsets"][1] - d["offsets"][0]
    sl = slice(0, n * m)
    p, r, off = d["policy"][:, sl], d["ref"][sl], d["offsets"][: n + 1]
    aoff = np.array([0, 100, 101, n])
    got = ec.e_step(p, r, off, aoff, d["log_w"], beta=beta)
    want = _reference.e_step(p, r, off, aoff, d["log_w"], beta=beta)
    np.testing.assert_allclose(got.responsibilities, want[0], rtol=1e-4, atol=1e-5)
    loss, grad = ec.listwise_dpo_loss_and_grad(p[0], r, off, d["weights"][:n], beta=beta)
    loss_ref, grad_ref = _reference.listwise_dpo_loss_and_grad(p[0], r, off, d["weights"][:n],
                                                               beta=beta)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-4)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-5)


def peak_extra_memory_mb(N, m, K, H):
    """Peak resident-memory growth of one E-step, in a fresh process: the inputs are made,
    freed heap is returned to the system (malloc_trim), the kernel's peak-RSS counter is reset
    (/proc/self/clear_refs), and VmHWM after the E-step minus VmRSS before it is the extra
    memory the E-step touched (outputs included)."""
    code = f"""
import ctypes, gc, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_kernels import make_data
import emdpo_core as ec
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0
d = make_data({N}, {m}, {K}, {H})
ec.e_step(d['policy'][:, :{m * 64}], d['ref'][:{m * 64}], d['offsets'][:65], [0, 64], d['log_w'], beta=1.0)
gc.collect()
ctypes.CDLL('libc.so.6').malloc_trim(0)
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS')
res = ec.e_step(d['policy'], d['ref'], d['offsets'], d['aoff'], d['log_w'], beta=1.0)
print(status('VmHWM') - before)
"""
    # Run from the benchmarks folder so that the installed package, not the source tree
    # (which has no compiled module), is imported.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr}")
    return float(out.stdout.strip())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="records (lists)")
    ap.add_argument("--m", type=int, default=4, help="responses per list")
    ap.add_argument("--k", type=int, default=8, help="types")
    ap.add_argument("--annotators", type=int, default=50_000)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="N = 100,000, 5 repeats")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--output", type=Path, default=RESULTS / "bench_kernels.csv")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.annotators = 100_000, 5, 5_000
    N, m, K, H = args.n, args.m, args.k, min(args.annotators, args.n)
    print(f"emdpo-core {ec.__version__} kernels benchmark: N={N:,} lists of {m}, K={K}, "
          f"float32, device={args.device}, {ec.build_info()['num_threads']} threads")
    d = make_data(N, m, K, H)
    check_against_reference(d, args.beta)
    print("correctness vs float64 reference: ok")

    torch = None
    if not args.no_torch or args.device == "cuda":
        import torch
    sync = None
    if args.device == "cuda":
        sync = torch.cuda.synchronize
        dev = {k: torch.from_numpy(v).cuda() for k, v in d.items()}
        dev["log_w"] = dev["log_w"].double()
    else:
        dev = d
        if torch is not None:
            torch.set_num_threads(ec.build_info()["num_threads"])

    bw = harness.copy_bandwidth(args.device)
    M = N * m
    bytes_e = 4 * (K * M + M) + 8 * (N + 1) + 8 * (H + 1) + 2 * 4 * H * K
    bytes_l = 4 * (M + M + N) + 8 * (N + 1) + 4 * M  # read p, ref, w, offsets; write grad
    one_annot = np.array([0, N], dtype=np.int64)

    def run_e(aoff):
        return lambda: ec.e_step(dev["policy"], dev["ref"], dev["offsets"], aoff, dev["log_w"],
                                 beta=args.beta)

    aoff_dev = dev["aoff"]
    one_dev = one_annot if args.device == "cpu" else torch.from_numpy(one_annot).cuda()
    policy0 = dev["policy"][0]
    rows = []
    t_e = harness.timeit(run_e(aoff_dev), args.repeats, sync=sync)
    t_e1 = harness.timeit(run_e(one_dev), args.repeats, sync=sync)
    t_l = harness.timeit(lambda: ec.listwise_dpo_loss_and_grad(
        policy0, dev["ref"], dev["offsets"], dev["weights"], beta=args.beta), args.repeats, sync=sync)

    base_e = base_l = None
    if torch is not None and not args.no_torch:
        tdev = "cuda" if args.device == "cuda" else "cpu"
        tp = torch.from_numpy(d["policy"]).to(tdev)
        tr = torch.from_numpy(d["ref"]).to(tdev)
        layout = tref.PaddedLayout(torch.from_numpy(d["offsets"]), device=tdev)
        rec_ann = torch.repeat_interleave(torch.arange(H), torch.from_numpy(np.diff(d["aoff"]))).to(tdev)
        tlw = torch.from_numpy(d["log_w"]).to(tdev)
        tw = torch.from_numpy(d["weights"]).to(tdev)
        # same answer first
        g_t, _, _ = tref.e_step(tp, tr, layout, rec_ann, H, tlw, args.beta)
        g_c = ec.e_step(d["policy"], d["ref"], d["offsets"], d["aoff"], d["log_w"], beta=args.beta)
        np.testing.assert_allclose(g_t.cpu().numpy(), g_c.responsibilities, rtol=1e-3, atol=1e-4)
        l_t, grad_t = tref.loss_and_grad(tp[0], tr, layout, tw, args.beta)
        l_c, grad_c = ec.listwise_dpo_loss_and_grad(d["policy"][0], d["ref"], d["offsets"],
                                                    d["weights"], beta=args.beta)
        np.testing.assert_allclose(float(l_t), l_c, rtol=1e-3)
        np.testing.assert_allclose(grad_t.cpu().numpy(), grad_c, rtol=1e-3, atol=1e-5)
        base_e = harness.timeit(lambda: tref.e_step(tp, tr, layout, rec_ann, H, tlw, args.beta),
                                max(3, args.repeats // 2), sync=sync)
        base_l = harness.timeit(lambda: tref.loss_and_grad(tp[0], tr, layout, tw, args.beta),
                                max(3, args.repeats // 2), sync=sync)

    def row(op, impl, t, nbytes, baseline, annotators):
        r = harness.base_row(args.device)
        r.update(op=op, impl=impl, N=N, m=m, K=K if op != "loss_grad" else 1, H=annotators,
                 dtype="float32", p20_s=f"{t[0]:.6f}", p50_s=f"{t[1]:.6f}", p80_s=f"{t[2]:.6f}",
                 speedup_vs_torch=f"{baseline[1] / t[1]:.2f}" if baseline else "",
                 ns_per_record_type=f"{t[1] * 1e9 / (N * (K if op != 'loss_grad' else 1)):.3f}",
                 bytes_moved=nbytes if nbytes else "",
                 bandwidth_fraction=f"{nbytes / t[1] / bw:.3f}" if nbytes else "",
                 copy_bandwidth_GBs=f"{bw / 1e9:.2f}")
        rows.append(r)
        return r

    row("e_step", "emdpo", t_e, bytes_e, base_e, H)
    row("e_step", "emdpo", t_e1, bytes_e, base_e, 1)
    row("loss_grad", "emdpo", t_l, bytes_l, base_l, "")
    if base_e:
        row("e_step", "torch_vectorized", base_e, None, None, H)
        row("loss_grad", "torch_vectorized", base_l, None, None, "")
    if args.device == "cpu":
        mem = peak_extra_memory_mb(N, m, K, H)
        for r in rows:
            r["e_step_peak_extra_MB"] = f"{mem:.1f}" if r["op"] == "e_step" and r["impl"] == "emdpo" else ""
    else:
        for r in rows:
            r["e_step_peak_extra_MB"] = ""
    harness.append_rows(args.output, rows)

    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s")
    print(f"{'op':<10} {'impl':<17} {'H':>7} {'p20 ms':>9} {'p50 ms':>9} {'p80 ms':>9} "
          f"{'speed-up':>9} {'ns/(rec*type)':>14} {'of bw':>6}")
    for r in rows:
        print(f"{r['op']:<10} {r['impl']:<17} {str(r['H']):>7} {float(r['p20_s'])*1e3:9.2f} "
              f"{float(r['p50_s'])*1e3:9.2f} {float(r['p80_s'])*1e3:9.2f} "
              f"{(r['speedup_vs_torch'] + 'x') if r['speedup_vs_torch'] else '':>9} "
              f"{r['ns_per_record_type']:>14} {r['bandwidth_fraction']:>6}")
    print(f"E-step with one annotator owning all records / with {H:,} annotators: "
          f"{t_e1[1] / t_e[1]:.2f}x")
    if args.device == "cpu":
        print(f"E-step peak extra memory: {mem:.1f} MB")
    print(f"rows appended to {args.output}")
    return rows


if __name__ == "__main__":
    main()
