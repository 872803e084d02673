"""CUDA kernels on a GPU: correctness against the CPU kernels first, then timings.

Run by benchmarks/device_check.sh (one call on the GPU machine); it runs on its own too:

    python benchmarks/device_kernels.py --out DIR            # on a GPU machine
    python benchmarks/device_kernels.py --out DIR --dry-run  # anywhere: tiny sizes on CPU

Sections, each under its own guard so that one failure does not hide the others:
  1. copy bandwidth: a 1 GiB device-to-device copy, bytes read + written per second;
  2. correctness: the E-step at H = 1, 50,000 and N (one annotator per record), with
     annotator weights and type totals, and the loss + gradient at K = 8, against the CPU
     kernels on the same float32 inputs (relative errors against the tolerance table);
  3. timings with CUDA events (median of repeats after warm-up) of the kernels through
     _core (no Python validation), the public functions on CUDA tensors, the vectorized
     PyTorch baseline (emdpo_core.bench.torch_baseline), K = 64 and long-list rows; bytes moved
     by the model of benchmarks/README.md ("Bandwidth model") and the fraction of copy
     bandwidth;
  4. a per-kernel breakdown of one E-step and one loss call (torch.profiler).
Writes DIR/kernels.csv, DIR/kernels_table.txt (printed last) and DIR/profile.txt.
With --dry-run the same code runs on the CPU kernels at tiny sizes (the GPU-only parts are
skipped with a note), so a first GPU run does not fail on a typo.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

import emdpo_core as ec
from emdpo_core import _core
from emdpo_core.bench import routines, torch_baseline as tb

F4, I8 = 4, 8


def log(msg):
    print(msg, flush=True)


class Timer:
    """Median of `reps` timed calls after `warmup` calls: CUDA events on a GPU, the host
    clock (after a synchronize) elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps=20, warmup=3):
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e-3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def make_inputs(N, m, K, device, seed=0):
    """N lists of m slots, K types, float32; types share a base as fine-tuned policies do."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    M = N * m
    base = torch.randn(M, generator=g) * 3.0 - 40.0
    policy = (base + 0.3 * torch.randn(K, M, generator=g)).to(device).contiguous()
    ref = (base + 0.3 * torch.randn(M, generator=g)).to(device).contiguous()
    offsets = torch.arange(0, M + 1, m, dtype=torch.int64).to(device)
    return policy, ref, offsets


def annotator_offsets(N, H, device):
    return (torch.arange(H + 1, dtype=torch.int64) * N // H).to(device)


def bytes_e_step(N, M, K, H):
    """Fewest bytes the E-step moves (benchmarks/README.md, Bandwidth model): policy, ref,
    offsets, annotator offsets in; responsibilities and annotator log-likelihoods out."""
    return K * M * F4 + M * F4 + (N + 1) * I8 + (H + 1) * I8 + 2 * H * K * F4


def bytes_loss(N, M, K):
    """policy, ref, offsets, weights (K, N) in; grad (K, M) out."""
    return K * M * F4 + M * F4 + (N + 1) * I8 + K * N * F4 + K * M * F4


def bytes_loglik(N, M, K):
    return K * M * F4 + M * F4 + (N + 1) * I8 + N * K * F4


def rel_err(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def raw_e_step(policy, ref, offsets, ao, log_w, beta, v=None, totals=None):
    """_core.cuda_e_step with preallocated outputs; returns a closure that runs it."""
    K, M = policy.shape
    N, H = offsets.numel() - 1, ao.numel() - 1
    dev = policy.device
    resp = torch.empty((H, K), dtype=policy.dtype, device=dev)
    annot = torch.empty_like(resp)
    loglik = torch.empty(1, dtype=torch.float64, device=dev)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=dev)
    ws_bytes = _core.cuda_e_step_workspace_bytes(N, H, K)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    ptr = (lambda x: 0 if x is None else x.data_ptr())

    def run():
        _core.cuda_e_step("float32", policy.data_ptr(), ref.data_ptr(), offsets.data_ptr(), 0, 0,
                          ao.data_ptr(), log_w.data_ptr(), N, M, K, H, beta, resp.data_ptr(),
                          annot.data_ptr(), loglik.data_ptr(), 0, first_bad.data_ptr(),
                          ws.data_ptr(), ws_bytes, stream, ptr(v), ptr(totals))

    return run, resp, annot, loglik, first_bad, ws_bytes


def raw_loss(policy, ref, offsets, weights, beta):
    K, M = policy.shape
    N = offsets.numel() - 1
    dev = policy.device
    grad = torch.empty_like(policy)
    scale = torch.ones(K, dtype=torch.float64, device=dev)
    loss = torch.empty((), dtype=torch.float64, device=dev)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=dev)
    ws_bytes = _core.cuda_loss_workspace_bytes(N, K)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream

    def run():
        _core.cuda_listwise_dpo_loss_and_grad(
            "float32", policy.data_ptr(), ref.data_ptr(), offsets.data_ptr(), 0,
            weights.data_ptr(), scale.data_ptr(), N, M, K, beta, loss.data_ptr(), grad.data_ptr(),
            0, first_bad.data_ptr(), ws.data_ptr(), ws_bytes, stream)

    return run, loss, grad, first_bad


def raw_loglik(policy, ref, offsets, beta):
    K, M = policy.shape
    N = offsets.numel() - 1
    out = torch.empty((N, K), dtype=policy.dtype, device=policy.device)
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=policy.device)
    stream = torch.cuda.current_stream(policy.device).cuda_stream

    def run():
        _core.cuda_listwise_loglik("float32", policy.data_ptr(), ref.data_ptr(),
                                   offsets.data_ptr(), 0, N, M, K, beta, out.data_ptr(),
                                   first_bad.data_ptr(), stream)

    return run, out


class Report:
    def __init__(self, copy_bw):
        self.copy_bw = copy_bw
        self.rows = []
        self.notes = []

    def add(self, kernel, shape, t, nbytes=None, baseline=None, note=""):
        med, p20, p80 = t
        gbs = None if nbytes is None else nbytes / med / 1e9
        frac = None if (gbs is None or not self.copy_bw) else gbs * 1e9 / self.copy_bw
        row = dict(kernel=kernel, shape=shape, p50_ms=med * 1e3, p20_ms=p20 * 1e3,
                   p80_ms=p80 * 1e3, GB_s=gbs, frac_copy=frac,
                   speedup_vs_torch=None if baseline is None else baseline / med, note=note)
        self.rows.append(row)
        log(f"  {kernel:26s} {shape:26s} {med * 1e3:9.3f} ms"
            + ("" if gbs is None else f" {gbs:8.0f} GB/s")
            + ("" if frac is None else f" {100 * frac:5.1f}% copy")
            + ("" if baseline is None else f"  x{baseline / med:.1f} vs torch") + f"  {note}")

    def table(self):
        head = (f"{'kernel':26s} {'shape':26s} {'p50 ms':>9s} {'GB/s':>7s} {'%copy':>6s} "
                f"{'vs torch':>8s}  note")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r['kernel']:26s} {r['shape']:26s} {r['p50_ms']:9.3f} "
                + (f"{r['GB_s']:7.0f} " if r['GB_s'] is not None else f"{'-':>7s} ")
                + (f"{100 * r['frac_copy']:5.1f}% " if r['frac_copy'] is not None else f"{'-':>6s} ")
                + (f"{r['speedup_vs_torch']:7.1f}x " if r['speedup_vs_torch'] else f"{'-':>8s} ")
                + f" {r['note']}")
        return "\n".join(lines + self.notes)


def section(name, fn, failures):
    log(f"\n--- {name}")
    t0 = time.perf_counter()
    try:
        fn()
    except Exception:  # noqa: BLE001 - report and go on with the next section
        failures.append(name)
        traceback.print_exc()
    log(f"--- {name}: {time.perf_counter() - t0:.1f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="device_check_out")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on the CPU kernels: checks the script, not the GPU")
    ap.add_argument("--n", type=int, default=10_000_000, help="lists of 4 in the main rows")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dry = args.dry_run
    dev = torch.device("cpu" if dry else "cuda")
    if not dry and not (torch.cuda.is_available() and getattr(_core, "cuda", False)):
        log("no CUDA device or emdpo_core built without CUDA: use --dry-run")
        return 2
    timer = Timer(dev)
    N = 20_000 if dry else args.n
    m, K, beta = 4, 8, 0.5
    reps = 3 if dry else 20
    failures = []
    state = {}

    def copy_bandwidth():
        n = (1 << 20) if dry else (1 << 28)  # 1 GiB of float32 on the GPU
        src = torch.rand(n, device=dev)
        dst = torch.empty_like(src)
        t = timer(lambda: dst.copy_(src), reps=reps)
        state["copy_bw"] = 2 * n * F4 / t[0]
        log(f"  copy bandwidth {state['copy_bw'] / 1e9:.0f} GB/s (read + write, p50 of {reps})")

    section("copy bandwidth", copy_bandwidth, failures)
    rep = Report(state.get("copy_bw"))

    policy, ref, offsets = make_inputs(N, m, K, dev)
    M = N * m
    log_w = torch.log(torch.full((K,), 1.0 / K, dtype=torch.float64)).to(dev)
    H_list = [1, min(50_000, N), N]

    def correctness():
        # The CPU kernels on the same float32 values (16 cores on the GPU machine: ~1 s).
        p_h, r_h, o_h = (x.cpu().numpy() for x in (policy, ref, offsets))
        tol = 1e-4  # tests/conftest.py TOL for float32
        worst = 0.0
        for H in H_list:
            ao = annotator_offsets(N, H, dev)
            v = torch.rand(H, dtype=torch.float64, generator=torch.Generator().manual_seed(H)).to(dev)
            want_tt = np.zeros(K)
            want = _cpu_e_step(p_h, r_h, o_h, ao.cpu().numpy(), log_w.cpu().numpy(), beta,
                               v.cpu().numpy(), want_tt)
            if dry:
                got = ec.e_step(policy, ref, offsets, ao, log_w, beta=beta)
                got_resp, got_ll, got_tt = got.responsibilities, None, None
                got_annot = got.annotator_loglik
            else:
                tt = torch.empty(K, dtype=torch.float64, device=dev)
                run, resp, annot, loglik, first_bad, _ = raw_e_step(policy, ref, offsets, ao,
                                                                    log_w, beta, v, tt)
                run()
                torch.cuda.synchronize()
                assert int(first_bad.item()) == -1, "non-finite flag set on finite inputs"
                got_resp, got_annot, got_ll, got_tt = resp, annot, float(loglik.item()), tt
            errs = {"resp": rel_err(got_resp.cpu(), want["resp"]),
                    "annot_ll": rel_err(got_annot.cpu(), want["annot"])}
            if got_ll is not None:
                errs["v-loglik"] = abs(got_ll - want["loglik"]) / max(abs(want["loglik"]), 1e-300)
                errs["type_totals"] = rel_err(got_tt.cpu(), want_tt)
            worst = max(worst, max(errs.values()))
            log(f"  e_step H={H:<9d} " + "  ".join(f"{k} {e:.1e}" for k, e in errs.items()))
        w = torch.rand(K, N, generator=torch.Generator().manual_seed(7)).to(dev)
        loss_c, grad_c = ec.listwise_dpo_loss_and_grad(p_h, r_h, o_h, w.cpu().numpy(), beta=beta)
        loss_g, grad_g = ec.listwise_dpo_loss_and_grad(policy, ref, offsets, w, beta=beta)
        e_loss = abs(float(loss_g) - loss_c) / abs(loss_c)
        e_grad = rel_err(grad_g.cpu(), grad_c)
        worst = max(worst, e_loss, e_grad)
        log(f"  loss+grad K={K}: loss {e_loss:.1e}  grad {e_grad:.1e}")
        state["correct"] = worst <= tol
        rep.notes.append(f"correctness vs CPU kernels (float32, N={N}): worst relative error "
                         f"{worst:.1e} {'<=' if worst <= tol else '>'} {tol:g}")
        if worst > tol:
            raise AssertionError(f"CUDA kernels differ from the CPU kernels: {worst:.2e} > {tol}")

    section("correctness against the CPU kernels", correctness, failures)

    def timings():
        if dry:
            rep.notes.append("dry run: CPU kernels at tiny sizes; no GPU figures")
            t = timer(lambda: ec.e_step(policy, ref, offsets, annotator_offsets(N, N, dev), log_w,
                                        beta=beta), reps=reps)
            rep.add("api: e_step (cpu)", f"N={N} K={K} H=N", t, bytes_e_step(N, M, K, N))
            w = torch.rand(K, N, device=dev)
            t = timer(lambda: routines.torch_loss_and_grad(
                policy, ref, offsets, w, beta=beta, return_tensors=True), reps=reps)
            rep.add("api: loss_and_grad (cpu)", f"N={N} K={K}", t, bytes_loss(N, M, K))
            return
        shape = f"N={N:.0e} m={m} K={K}".replace("+0", "")
        for H in H_list:
            ao = annotator_offsets(N, H, dev)
            run, resp, *_ = raw_e_step(policy, ref, offsets, ao, log_w, beta)
            t = timer(run, reps=reps)
            first = resp.clone()
            run()
            same = torch.equal(first, resp)
            base = None
            if H in (min(50_000, N), N):
                base = _torch_e_step_time(timer, policy, ref, offsets, ao, H, log_w, beta)
            rep.add("e_step", f"{shape} H={H}", t, bytes_e_step(N, M, K, H), base,
                    "bitwise repeat" if same else "NOT BITWISE REPEATABLE")
        w = torch.rand(K, N, device=dev)
        run, *_ = raw_loss(policy, ref, offsets, w, beta)
        t = timer(run, reps=reps)
        base = _torch_loss_time(timer, policy, ref, offsets, w, beta)
        rep.add("loss+grad", shape, t, bytes_loss(N, M, K), base)
        run, _ = raw_loglik(policy, ref, offsets, beta)
        rep.add("listwise_loglik", shape, timer(run, reps=reps), bytes_loglik(N, M, K))
        # The public functions (validation cached after the first call; loss returned as a
        # tensor, so no host sync; the E-step returns loglik as a float: one sync).
        rep.add("api: loss_and_grad", shape, timer(lambda: routines.torch_loss_and_grad(
            policy, ref, offsets, w, beta=beta, return_tensors=True), reps=10),
            bytes_loss(N, M, K), None, "incl. Python")
        ao = annotator_offsets(N, N, dev)
        rep.add("api: e_step", f"{shape} H=N", timer(lambda: ec.e_step(
            policy, ref, offsets, ao, log_w, beta=beta), reps=10), bytes_e_step(N, M, K, N),
            None, "incl. Python + loglik sync")
        del w

    section("timings (CUDA events)", timings, failures)

    def wide_and_long():
        if dry:
            return
        # K = 64 (the finish kernel path) and long lists, smaller N to fit the time budget.
        for (n, mm, k) in ((2_000_000, 4, 64), (500_000, 64, 8), (100_000, 256, 8)):
            p, r, o = make_inputs(n, mm, k, dev, seed=mm + k)
            mM = n * mm
            lw = torch.log(torch.full((k,), 1.0 / k, dtype=torch.float64)).to(dev)
            ao = annotator_offsets(n, n // 20, dev)
            run, *_ = raw_e_step(p, r, o, ao, lw, beta)
            rep.add("e_step", f"N={n} m={mm} K={k} H=N/20", timer(run, reps=10),
                    bytes_e_step(n, mM, k, n // 20))
            w = torch.rand(k, n, device=dev)
            run, *_ = raw_loss(p, r, o, w, beta)
            rep.add("loss+grad", f"N={n} m={mm} K={k}", timer(run, reps=10),
                    bytes_loss(n, mM, k))
            del p, r, o, w

    section("K = 64 and long lists", wide_and_long, failures)

    def profile():
        if dry:
            return
        from torch.profiler import ProfilerActivity, profile as tprof
        ao = annotator_offsets(N, min(50_000, N), dev)
        w = torch.rand(K, N, device=dev)
        e_run, *_ = raw_e_step(policy, ref, offsets, ao, log_w, beta, None,
                               torch.empty(K, dtype=torch.float64, device=dev))
        l_run, *_ = raw_loss(policy, ref, offsets, w, beta)
        e_run(), l_run()
        torch.cuda.synchronize()
        with tprof(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                e_run()
                l_run()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                          max_name_column_width=60)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write(table)
        log(table)

    section("per-kernel breakdown (torch.profiler)", profile, failures)

    with open(os.path.join(args.out, "kernels.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["device", "torch", "commit", "copy_GB_s"]
                            + list(rep.rows[0] if rep.rows else ["kernel"]))
        wr.writeheader()
        name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (dry run)"
        for r in rep.rows:
            wr.writerow(dict(device=name, torch=torch.__version__,
                             commit=os.environ.get("EMDPO_GIT_COMMIT", ""),
                             copy_GB_s=f"{(rep.copy_bw or 0) / 1e9:.0f}", **r))
    if rep.copy_bw:
        rep.notes.insert(0, f"copy bandwidth (device-to-device, read + write): "
                            f"{rep.copy_bw / 1e9:.0f} GB/s")
    if failures:
        rep.notes.append("FAILED sections: " + ", ".join(failures))
    text = rep.table()
    with open(os.path.join(args.out, "kernels_table.txt"), "w") as f:
        f.write(text + "\n")
    log("\n" + text)
    return 1 if failures else 0


def _cpu_e_step(p, r, o, ao, log_w, beta, v, type_totals):
    """The CPU kernels' E-step with annotator weights and type totals (when this build's
    CPU kernel takes them), in float32 like the GPU run."""
    K, M = p.shape
    N, H = len(o) - 1, len(ao) - 1
    try:
        resp = np.empty((H, K), np.float32)
        annot = np.empty_like(resp)
        bad, loglik = _core.e_step(p, r, o, None, None, ao, log_w, N, M, K, H, beta, resp, annot,
                                   None, annotator_weights=v, type_totals=type_totals)
        assert bad == -1
        return dict(resp=resp, annot=annot, loglik=float(loglik))
    except TypeError:  # an older CPU binding: the public function, totals formed here
        res = ec.e_step(p, r, o, ao, log_w, beta=beta)
        x = log_w + res.annotator_loglik.astype(np.float64)
        lse = x.max(1) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1))
        type_totals[:] = v @ res.responsibilities.astype(np.float64)
        return dict(resp=res.responsibilities, annot=res.annotator_loglik, loglik=float(v @ lse))


def _torch_e_step_time(timer, policy, ref, offsets, ao, H, log_w, beta):
    layout = tb.PaddedLayout(offsets, device=policy.device)
    counts = ao[1:] - ao[:-1]
    rec_ann = torch.repeat_interleave(torch.arange(H, device=policy.device), counts)
    return timer(lambda: tb.e_step(policy, ref, layout, rec_ann, H, log_w, beta), reps=5,
                 warmup=1)[0]


def _torch_loss_time(timer, policy, ref, offsets, w, beta):
    layout = tb.PaddedLayout(offsets, device=policy.device)
    return timer(lambda: tb.loss_and_grad(policy, ref, layout, w, beta), reps=5, warmup=1)[0]


if __name__ == "__main__":
    sys.exit(main())
