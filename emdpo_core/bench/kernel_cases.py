"""The ``emdpo bench`` cases of the compiled kernels, each against its baseline on the same
data: the fused E-step and the listwise loss + gradient (vs vectorized PyTorch), the E-step
vs the authors' per-annotator Python loop, the regret matrix (vs vectorized NumPy, PyTorch
on CUDA), and one point of the scaling tables (N, K, m)."""

from __future__ import annotations

import numpy as np

from .harness import Env, Recorder, nbytes, rounds
from .workload import (BETA, Layout, OnDevice, Sizes, bytes_e_step, bytes_loss, check_kernels,
                       make_layout, to_numpy)


def case_e_step(rec: Recorder, env: Env, d: Layout, repeats: int) -> None:
    import emdpo_core as ec

    dev = OnDevice(d, env)
    ours = ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w, beta=BETA)
    fns = {"emdpo": lambda: ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w,
                                      beta=BETA)}
    note = ""
    torch = env.torch
    if torch is not None:
        from emdpo_core.bench import torch_baseline as tb

        tdev = env.device
        layout = tb.PaddedLayout(torch.from_numpy(d.offsets), device=tdev)
        rec_ann = torch.repeat_interleave(torch.arange(d.H),
                                          torch.from_numpy(np.diff(d.aoff))).to(tdev)
        tp, tr = torch.from_numpy(d.policy).to(tdev), torch.from_numpy(d.ref).to(tdev)
        tlw = torch.from_numpy(d.log_w).to(tdev)
        g_t, ll_t, _ = tb.e_step(tp, tr, layout, rec_ann, d.H, tlw, BETA)
        # float32 per-record math on both sides, summed over ~N/H records per annotator.
        np.testing.assert_allclose(to_numpy(g_t), to_numpy(ours.responsibilities),
                                   rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(ll_t, float(ours.loglik), rtol=1e-4)
        fns["torch_vectorized"] = lambda: tb.e_step(tp, tr, layout, rec_ann, d.H, tlw, BETA)
    else:
        note = "torch not installed: PyTorch baseline skipped"
    t = rounds(fns, repeats, env.sync)
    base = t.get("torch_vectorized")
    shape = dict(N=d.N, m=d.m, K=d.K, H=d.H, dtype="float32", others=t.others)
    rec.add("main", "e_step", "emdpo", t["emdpo"], baseline="torch_vectorized" if base is not
            None else "", baseline_times=base, work=d.N * d.K, nbytes=bytes_e_step(d, ours),
            note=note, **shape)
    if base is not None:
        rec.add("main", "e_step", "torch_vectorized", base, work=d.N * d.K, **shape)


def case_loss_grad(rec: Recorder, env: Env, d: Layout, repeats: int) -> None:
    import emdpo_core as ec

    dev = OnDevice(d, env)
    loss_k, grad_k = ec.listwise_dpo_loss_and_grad(dev.policy, dev.ref, dev.offsets,
                                                   dev.weights, beta=BETA)
    fns = {"emdpo_kernel": lambda: ec.listwise_dpo_loss_and_grad(
        dev.policy, dev.ref, dev.offsets, dev.weights, beta=BETA)}
    torch = env.torch
    et = None
    note = ""
    if torch is None:
        note = "torch not installed: autograd path and PyTorch baseline skipped"
    else:
        try:
            import emdpo_core.torch as et
        except ImportError as e:     # a build without the torch layer
            note = f"emdpo_core.torch unavailable ({e}): autograd path skipped"
    if et is not None:
        from emdpo_core.bench import torch_baseline as tb

        tdev = env.device
        tp = torch.from_numpy(d.policy).to(tdev)
        tr = torch.from_numpy(d.ref).to(tdev)
        toff = torch.from_numpy(d.offsets).to(tdev)
        tw = torch.from_numpy(d.weights).to(tdev)
        leaf = tp.clone().requires_grad_()
        layout = tb.PaddedLayout(toff, device=tdev)

        def ours():
            leaf.grad = None
            et.listwise_dpo_loss(leaf, tr, toff, tw, beta=BETA, reduction="sum").backward()

        ours()
        loss_t, grad_t = tb.loss_and_grad(tp, tr, layout, tw, BETA)
        # float32 sums of N*K terms: ~1e-6 relative rounding each side; 1e-3 leaves margin.
        np.testing.assert_allclose(float(loss_t), float(loss_k), rtol=1e-3)
        np.testing.assert_allclose(to_numpy(grad_t), to_numpy(grad_k), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(to_numpy(leaf.grad), to_numpy(grad_k), rtol=1e-5,
                                   atol=1e-7)
        fns["emdpo_autograd"] = ours
        fns["torch_vectorized"] = lambda: tb.loss_and_grad(tp, tr, layout, tw, BETA)
    t = rounds(fns, repeats, env.sync)
    base = t.get("torch_vectorized")
    shape = dict(N=d.N, m=d.m, K=d.K, H="", dtype="float32", others=t.others)
    nbytes = bytes_loss(d)
    if "emdpo_autograd" in t:
        rec.add("main", "loss_grad", "emdpo_autograd", t["emdpo_autograd"],
                baseline="torch_vectorized", baseline_times=base, work=d.N * d.K,
                nbytes=nbytes, **shape)
    rec.add("main", "loss_grad", "emdpo_kernel", t["emdpo_kernel"],
            baseline="torch_vectorized" if base is not None else "", baseline_times=base,
            work=d.N * d.K, nbytes=nbytes, note=note or "fused kernel call, no autograd",
            **shape)
    if base is not None:
        rec.add("main", "loss_grad", "torch_vectorized", base, work=d.N * d.K, **shape)


def case_e_step_loop(rec: Recorder, env: Env, sizes: Sizes, seed: int) -> None:
    import emdpo_core as ec
    from emdpo_core.bench import numpy_baseline as nb

    d = make_layout(sizes.loop_N, sizes.m, sizes.K, max(1, sizes.loop_N // 20), seed + 1)
    ours = ec.e_step(d.policy, d.ref, d.offsets, d.aoff, d.log_w, beta=BETA)
    resp, ll = nb.e_step_python_loop(d.policy, d.ref, d.offsets, d.aoff, d.log_w, beta=BETA)
    np.testing.assert_allclose(resp, ours.responsibilities, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ll, ours.loglik, rtol=1e-4)
    t = rounds({
        "emdpo": lambda: ec.e_step(d.policy, d.ref, d.offsets, d.aoff, d.log_w, beta=BETA),
        "python_loop": lambda: nb.e_step_python_loop(d.policy, d.ref, d.offsets, d.aoff,
                                                     d.log_w, beta=BETA),
    }, min(5, sizes.repeats), lambda: None)   # the loop is slow: at most 5 rounds
    shape = dict(N=d.N, m=d.m, K=d.K, H=d.H, dtype="float32", device="cpu", others=t.others)
    rec.add("main", "e_step_loop", "emdpo", t["emdpo"], baseline="python_loop",
            baseline_times=t["python_loop"], work=d.N * d.K, nbytes=bytes_e_step(d, ours),
            note="NumPy inputs on the CPU", **shape)
    rec.add("main", "e_step_loop", "python_loop", t["python_loop"], work=d.N * d.K,
            note="the authors' style: loop over annotators, records, types", **shape)


def case_regret(rec: Recorder, env: Env, sizes: Sizes, repeats: int, seed: int) -> None:
    import emdpo_core as ec
    from emdpo_core.bench import numpy_baseline as nb
    from emdpo_core.ops import _reference

    for K, S in sizes.regret:
        rng = np.random.default_rng(seed + K)
        counts = rng.multinomial(S - K, np.full(K, 1.0 / K)) + 1   # every policy >= 1 sample
        so = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        lp = rng.normal(-40.0, 3.0, size=(K, S))
        ref = rng.normal(-40.0, 3.0, size=S)
        if env.device == "cuda":
            from emdpo_core.bench import torch_baseline as tb

            torch = env.torch
            x = (torch.from_numpy(lp).cuda(), torch.from_numpy(ref).cuda(),
                 torch.from_numpy(so).cuda())
            base_name, base_fn = "torch_vectorized", tb.regret_matrix
        else:
            x = (lp, ref, so)
            base_name, base_fn = "numpy_vectorized", nb.regret_matrix
        for kind in ("reward", "kl"):
            want = _reference.regret_matrix(lp, ref, so, beta=1.0, kind=kind)
            got = to_numpy(ec.regret_matrix(*x, beta=1.0, kind=kind))
            base = to_numpy(base_fn(*x, beta=1.0, kind=kind))
            # float64 means of S/K samples of magnitude ~40: rounding ~1e-12.
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
            np.testing.assert_allclose(base, want, rtol=0, atol=1e-9)
            t = rounds({
                "emdpo": lambda: ec.regret_matrix(*x, beta=1.0, kind=kind),
                base_name: lambda: base_fn(*x, beta=1.0, kind=kind),
            }, repeats, env.sync)
            moved = nbytes(lp, so) + (ref.nbytes if kind == "reward" else 0) + 8 * K * K
            shape = dict(N=S, K=K, dtype="float64", others=t.others)
            rec.add("main", f"regret_{kind}", "emdpo", t["emdpo"], baseline=base_name,
                    baseline_times=t[base_name], work=S * K, nbytes=moved,
                    accuracy=f"{float(np.max(np.abs(got - want))):.2g}",
                    note="N = samples; accuracy = max |R - float64 reference|", **shape)
            rec.add("main", f"regret_{kind}", base_name, t[base_name], work=S * K, **shape)


def scaling_point(rec: Recorder, env: Env, table: str, N: int, m: int, K: int,
                   repeats: int, seed: int) -> None:
    import emdpo_core as ec

    d = make_layout(N, m, K, max(1, N // 20), seed)
    check_kernels(d, n=50)
    dev = OnDevice(d, env)
    out = ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w, beta=BETA)
    t = rounds({
        "e_step": lambda: ec.e_step(dev.policy, dev.ref, dev.offsets, dev.aoff, dev.log_w,
                                    beta=BETA),
        "loss_grad": lambda: ec.listwise_dpo_loss_and_grad(dev.policy, dev.ref, dev.offsets,
                                                           dev.weights, beta=BETA),
    }, repeats, env.sync)
    shape = dict(N=N, m=m, K=K, dtype="float32", others=t.others)
    rec.add(table, "e_step", "emdpo", t["e_step"], H=d.H, work=N * K,
            nbytes=bytes_e_step(d, out), **shape)
    rec.add(table, "loss_grad", "emdpo_kernel", t["loss_grad"], work=N * K,
            nbytes=bytes_loss(d), **shape)
