"""CUDA kernels against the float64 reference, through the public functions with torch CUDA
tensors (ec.listwise_loglik, ec.e_step, ec.listwise_dpo_loss_and_grad).

The GPU tests skip with the reason when torch is missing, when emdpo_core was built without
CUDA, or when no CUDA device is visible. The tests at the end run on any machine: a CUDA
build imports and reports itself where there is no device (or no driver), a build without
CUDA refuses CUDA tensors with rebuild instructions, and the validation cache of the CUDA
path never lets an unchecked tensor through.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core import _core
from emdpo_core.ops import _reference as reference

# The fast subset run against an installed wheel (`pytest -m smoke`, .ci/wheel_smoke.sh).
pytestmark = pytest.mark.smoke

try:
    import torch
except ImportError:  # the NumPy path works without torch; these tests need it
    torch = None


def _gpu_skip_reason():
    if torch is None:
        return "torch is not installed"
    if not _core.cuda:
        return ("emdpo_core was built without CUDA (build_info()['cuda'] is False); "
                "rebuild with EMDPO_WITH_CUDA=ON on a machine with nvcc")
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return None


_GPU_SKIP = _gpu_skip_reason()


def gpu(test):
    return pytest.mark.cuda(pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))(test))


needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

DTYPES = ("float32", "float64")
# Bounds on ||out - ref|| / ||ref|| (and elementwise, relative to the largest |ref|), from the
# project's accuracy targets: float64 to ~1e-10, float32 to ~1e-4. float32 inputs run the
# per-record math in float32 (about 1e-7 relative per operation); sums are in float64.
TOL = {"float32": 1e-4, "float64": 1e-10}


# ----------------------------------------------------------------------------------------
# Inputs


def _lengths(rng, N, layout):
    """List lengths m_i and ranking depths L_i for a layout."""
    if layout == "pairs":
        m = np.full(N, 2)
        return m, np.ones(N, np.int64)
    if layout == "best_of_3":
        m = np.full(N, 3)
        return m, np.ones(N, np.int64)
    # ragged: mostly short lists, some long ones up to 300
    m = rng.integers(2, 9, N)
    long = rng.random(N) < 0.03
    m[long] = rng.integers(50, 301, int(long.sum()))
    m[: min(N, 2)] = [2, 300][: min(N, 2)]
    if layout == "full":
        return m, None
    if layout == "top_l":  # partial rankings: L_i in [1, m_i - 1]
        return m, np.array([rng.integers(1, mi) for mi in m], dtype=np.int64)
    raise ValueError(layout)


def make_records(rng, N, K, layout="top_l", dtype="float64", logp_scale=3.0, shift=0.0):
    """Random ragged records: (policy (K, M), ref (M,), offsets (N+1,), n_ranked or None).

    Types share a base log-probability plus a type-specific part, as policies fine-tuned
    from one reference do, so posteriors over types are not all 0 or 1."""
    m, n_ranked = _lengths(rng, N, layout)
    offsets = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    M = int(offsets[-1])
    base = rng.normal(size=M) * logp_scale + shift
    policy = base + 0.3 * rng.normal(size=(K, M))
    ref = base + 0.3 * rng.normal(size=M)
    return policy.astype(dtype), ref.astype(dtype), offsets, n_ranked


def make_annotators(rng, N, layout):
    """annotator_offsets (H+1,) for N records grouped by annotator."""
    if layout == "one":
        return np.array([0, N], dtype=np.int64)
    if layout == "singletons":
        return np.arange(N + 1, dtype=np.int64)
    sizes = []
    if layout == "random":  # sizes around the kernels' 256-record tiles, and tiny ones
        while sum(sizes) < N:
            sizes.append(int(rng.choice([1, 2, 3, 7, 40, 255, 256, 257, 600])))
    elif layout == "with_empty":  # empty annotators first, in between and last
        sizes = [0, 0]
        while sum(sizes) < N:
            sizes += [int(rng.integers(1, 30))] + [0] * int(rng.integers(0, 3))
        sizes += [0, 0]
    else:
        raise ValueError(layout)
    ends = np.minimum(np.cumsum(sizes), N)  # the last annotators are cut at N (or empty)
    return np.concatenate([[0], ends]).astype(np.int64)


def cuda(x, dtype=None):
    t = torch.as_tensor(np.ascontiguousarray(x), device="cuda")
    return t if dtype is None else t.to(getattr(torch, dtype))


def host(x):
    return x.detach().cpu().numpy().astype(np.float64) if isinstance(x, torch.Tensor) else x


def assert_close(got, want, dtype, what):
    got, want = host(got), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values (an output left unwritten?)"
    tol = TOL[dtype]
    scale = max(float(np.abs(want).max()), 1e-300)
    rel = float(np.linalg.norm(got - want)) / max(float(np.linalg.norm(want)), 1e-300)
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e}"
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every torch.empty in the dispatch comes back filled with NaN (floats) or 0xFF bytes
    (integers, the kernels' workspace), so an output or workspace entry that a kernel reads
    or returns without writing it first shows up as a failure instead of a lucky zero."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(255)
        else:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", empty)


# ----------------------------------------------------------------------------------------
# GPU: values against the float64 reference


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,N,K", [
    ("top_l", 300, 3), ("full", 97, 1), ("pairs", 700, 2), ("best_of_3", 513, 9),
    ("top_l", 1, 1)])
def test_listwise_loglik_matches_reference(poisoned_outputs, dtype, layout, N, K):
    rng = np.random.default_rng(1)
    p, r, off, nr = make_records(rng, N, K, layout, dtype)
    beta = float(rng.uniform(0.1, 10.0))
    out = ec.listwise_loglik(cuda(p), cuda(r), cuda(off), beta=beta,
                             n_ranked=None if nr is None else cuda(nr))
    assert out.device.type == "cuda" and out.dtype == getattr(torch, dtype)
    assert_close(out, reference.listwise_loglik(p, r, off, beta=beta, n_ranked=nr), dtype,
                 "listwise_loglik")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_listwise_loglik_one_policy_and_extremes(dtype):
    rng = np.random.default_rng(2)
    # log-probabilities near -1e4 and beta = 10 (DESIGN: stable at the extremes)
    p, r, off, nr = make_records(rng, 120, 1, "top_l", dtype, shift=-1e4)
    want = reference.listwise_loglik(p, r, off, beta=10.0, n_ranked=nr)
    out = ec.listwise_loglik(cuda(p[0]), cuda(r), cuda(off), beta=10.0, n_ranked=cuda(nr))
    assert tuple(out.shape) == (120, 1)
    assert_close(out, want, dtype, "listwise_loglik, K=1 given as (M,)")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("annotators,N,K", [
    ("one", 600, 3), ("singletons", 300, 2), ("random", 900, 9), ("with_empty", 200, 1),
    ("one", 1, 1)])
def test_e_step_matches_reference(poisoned_outputs, dtype, annotators, N, K):
    rng = np.random.default_rng(3)
    p, r, off, nr = make_records(rng, N, K, "top_l", dtype, logp_scale=1.0)
    ao = make_annotators(rng, N, annotators)
    beta = float(rng.uniform(0.1, 2.0))
    log_w = np.log(rng.dirichlet(np.ones(K)))
    c = rng.uniform(0.0, 2.0, N).astype(dtype)
    res = ec.e_step(cuda(p), cuda(r), cuda(off), cuda(ao), log_w, beta=beta, n_ranked=cuda(nr),
                    record_weights=cuda(c), return_record_loglik=True)
    resp, loglik, S = reference.e_step(p, r, off, ao, log_w, beta=beta, n_ranked=nr,
                                       record_weights=c)
    H = len(ao) - 1
    assert tuple(res.responsibilities.shape) == (H, K)
    assert res.responsibilities.device.type == "cuda"
    assert_close(res.annotator_loglik, S, dtype, "annotator_loglik")
    assert_close(res.responsibilities, resp, dtype, "responsibilities")
    assert_close(np.array([res.loglik]), np.array([loglik]), dtype, "loglik")
    assert_close(res.record_loglik, reference.listwise_loglik(p, r, off, beta=beta, n_ranked=nr),
                 dtype, "record_loglik")
    assert res.loglik == pytest.approx(loglik, rel=TOL[dtype])


def _raw_e_step(p, r, off, ao, log_w, beta, nr=None, c=None, v=None, totals=True):
    """_core.cuda_e_step on CUDA copies, with the trailing annotator-weight and type-total
    pointers (0 = none). Returns host arrays (resp, annot_ll, loglik, type_totals)."""
    dtype = str(p.dtype)
    K, M = p.shape
    N, H = len(off) - 1, len(ao) - 1
    t = {k: cuda(x) for k, x in dict(p=p, r=r, off=off, ao=ao, lw=log_w).items()}
    nr_t = None if nr is None else cuda(nr)
    c_t = None if c is None else cuda(c)
    v_t = None if v is None else cuda(np.asarray(v, dtype=np.float64))
    resp = torch.full((H, K), float("nan"), dtype=t["p"].dtype, device="cuda")
    annot = torch.full_like(resp, float("nan"))
    loglik = torch.full((1,), float("nan"), dtype=torch.float64, device="cuda")
    tt = torch.full((K,), float("nan"), dtype=torch.float64, device="cuda") if totals else None
    first_bad = torch.full((1,), -1, dtype=torch.int64, device="cuda")
    ws_bytes = _core.cuda_e_step_workspace_bytes(N, H, K)
    ws = torch.full((max(ws_bytes, 1),), 255, dtype=torch.uint8, device="cuda")
    ptr = (lambda x: 0 if x is None else x.data_ptr())
    _core.cuda_e_step(dtype, t["p"].data_ptr(), t["r"].data_ptr(), t["off"].data_ptr(), ptr(nr_t),
                      ptr(c_t), t["ao"].data_ptr(), t["lw"].data_ptr(), N, M, K, H, beta,
                      resp.data_ptr(), annot.data_ptr(), loglik.data_ptr(), 0,
                      first_bad.data_ptr(), ws.data_ptr(), ws_bytes,
                      torch.cuda.current_stream().cuda_stream, ptr(v_t), ptr(tt))
    torch.cuda.synchronize()
    assert int(first_bad.item()) == -1
    return host(resp), host(annot), float(loglik.item()), None if tt is None else host(tt)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("annotators,N,K", [
    ("random", 3000, 8), ("random", 3000, 3), ("with_empty", 700, 8), ("random", 2000, 9),
    ("random", 1500, 64), ("singletons", 1000, 8), ("one", 777, 1), ("with_empty", 0, 8)])
def test_e_step_annotator_weights_and_type_totals(dtype, annotators, N, K):
    """The fused finishing (K <= 8: annotators inside a tile finished by the tile kernel,
    crossing ones by the cross kernel, empty ones before/between/after) and the finish
    kernel (K > 8), with annotator weights v: loglik = sum_h v_h lse_h and
    type_totals = sum_h v_h g_hk, against float64 sums formed here. Annotators of
    255/256/257 records straddle the 256-record tiles."""
    rng = np.random.default_rng(16)
    if N == 0:
        p, r = np.zeros((K, 2), dtype), np.zeros(2, dtype)
        off, nr = np.zeros(1, np.int64), None
        ao = np.zeros(6, np.int64)  # five annotators, no records
    else:
        p, r, off, nr = make_records(rng, N, K, "top_l", dtype, logp_scale=1.0)
        ao = make_annotators(rng, N, annotators)
    H = len(ao) - 1
    beta = float(rng.uniform(0.1, 2.0))
    log_w = np.log(rng.dirichlet(np.ones(K)))
    c = rng.uniform(0.0, 2.0, len(off) - 1).astype(dtype)
    v = rng.uniform(0.0, 3.0, H)
    resp, annot, loglik, tt = _raw_e_step(p, r, off, ao, log_w, beta, nr, c, v)
    if N == 0:
        S = np.zeros((H, K))
    else:
        S = _segment_sums(c[:, None].astype(np.float64) * reference.listwise_loglik(
            p, r, off, beta=beta, n_ranked=nr), ao)
    x = log_w + S
    lse = x.max(axis=1) + np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1))
    g = np.exp(x - lse[:, None])
    assert_close(annot, S, dtype, "annotator_loglik")
    assert_close(resp, g, dtype, "responsibilities")
    assert loglik == pytest.approx(float(v @ lse), rel=TOL[dtype], abs=TOL[dtype])
    assert_close(tt, v @ g, dtype, "type_totals")
    # Without the optional pointers: loglik unweighted, nothing else changes.
    resp2, annot2, loglik2, _ = _raw_e_step(p, r, off, ao, log_w, beta, nr, c, None, False)
    assert np.array_equal(resp2, resp) and np.array_equal(annot2, annot)
    assert loglik2 == pytest.approx(float(lse.sum()), rel=TOL[dtype], abs=TOL[dtype])


def _segment_sums(values, annotator_offsets):
    """S[h] = sum of values over annotator h's records in float64 (0 for empty annotators).
    reduceat over the non-empty annotators' starts: empty ones have zero width."""
    ao = np.asarray(annotator_offsets)
    nonempty = ao[1:] > ao[:-1]
    S = np.zeros((len(ao) - 1, values.shape[1]))
    S[nonempty] = np.add.reduceat(values, ao[:-1][nonempty], axis=0)
    return S


@gpu
@pytest.mark.parametrize("annotators", ["one", "big_and_small", "singletons"])
def test_e_step_large_skewed(annotators):
    """Hundreds of thousands of records, so that annotators span many 256-record tiles and
    several groups of 256 tiles (the kernel's two reduction levels). The per-record values
    come from the CPU kernel in float64 (itself checked against the reference elsewhere);
    the sums and posteriors are formed here in float64."""
    rng = np.random.default_rng(4)
    N, K = 300_000, 4
    m = rng.integers(2, 4, N)
    off = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    M = int(off[-1])
    base = rng.normal(size=M)
    p, r = base + 0.05 * rng.normal(size=(K, M)), base + 0.05 * rng.normal(size=M)
    if annotators == "one":
        ao = np.array([0, N], dtype=np.int64)
    elif annotators == "singletons":
        ao = np.arange(N + 1, dtype=np.int64)
    else:  # one annotator with 200,000 records among many small ones
        sizes = [50_000, 7, 200_000] + [int(s) for s in rng.integers(1, 100, 2000)]
        ao = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), N)
        ao = np.concatenate([ao[ao < N], [N]]).astype(np.int64)
    log_w = np.log(np.full(K, 1.0 / K))
    res = ec.e_step(cuda(p), cuda(r), cuda(off), cuda(ao), log_w, beta=0.5)
    S = _segment_sums(ec.listwise_loglik(p, r, off, beta=0.5), ao)
    v = log_w + S
    lse = v.max(axis=1) + np.log(np.exp(v - v.max(axis=1, keepdims=True)).sum(axis=1))
    assert_close(res.annotator_loglik, S, "float64", "annotator_loglik")
    assert_close(res.responsibilities, np.exp(v - lse[:, None]), "float64", "responsibilities")
    assert res.loglik == pytest.approx(float(lse.sum()), rel=1e-10)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean", "none"])
@pytest.mark.parametrize("K", [1, 3])
def test_loss_and_grad_match_reference(poisoned_outputs, dtype, reduction, K):
    rng = np.random.default_rng(5)
    N = 400
    p, r, off, nr = make_records(rng, N, K, "top_l", dtype)
    beta = float(rng.uniform(0.1, 10.0))
    w = rng.uniform(0.0, 2.0, (K, N)).astype(dtype)
    pp, ww = (p[0], w[0]) if K == 1 else (p, w)  # K = 1 as (M,) and (N,)
    loss, grad = ec.listwise_dpo_loss_and_grad(cuda(pp), cuda(r), cuda(off), cuda(ww), beta=beta,
                                               n_ranked=cuda(nr), reduction=reduction)
    want_loss, want_grad = reference.listwise_dpo_loss_and_grad(
        pp, r, off, ww, beta=beta, n_ranked=nr, reduction=reduction)
    assert grad.device.type == "cuda" and tuple(grad.shape) == pp.shape
    assert_close(grad, want_grad, dtype, "grad")
    if reduction == "none":
        assert_close(loss, want_loss, dtype, "per-record loss")
    else:
        assert isinstance(loss, float)
        assert_close(np.array([loss]), np.array([want_loss]), dtype, "loss")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_without_weights_long_lists_and_return_tensors(dtype):
    rng = np.random.default_rng(6)
    p, r, off, nr = make_records(rng, 60, 2, "full", dtype)
    from emdpo_core.ops import _torch as _torch_dispatch  # return_tensors is the torch layer's option

    loss, grad = _torch_dispatch.listwise_dpo_loss_and_grad(
        cuda(p), cuda(r), cuda(off), beta=2.0, reduction="mean", return_tensors=True)
    want_loss, want_grad = reference.listwise_dpo_loss_and_grad(p, r, off, beta=2.0,
                                                                reduction="mean")
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.device.type == "cuda"
    assert_close(loss.reshape(1), np.array([want_loss]), dtype, "loss")
    assert_close(grad, want_grad, dtype, "grad")


# ----------------------------------------------------------------------------------------
# GPU: determinism, streams, errors


def _run_all(rng_seed, dtype):
    rng = np.random.default_rng(rng_seed)
    N, K = 5000, 9
    p, r, off, nr = make_records(rng, N, K, "top_l", dtype)
    ao = make_annotators(rng, N, "random")
    args = dict(p=cuda(p), r=cuda(r), off=cuda(off), nr=cuda(nr), ao=cuda(ao),
                c=cuda(rng.uniform(0, 1, N), dtype), w=cuda(rng.uniform(0, 1, (K, N)), dtype))
    log_w = np.log(np.full(K, 1.0 / K))

    def run():
        e = ec.e_step(args["p"], args["r"], args["off"], args["ao"], log_w, beta=1.5,
                      n_ranked=args["nr"], record_weights=args["c"], return_record_loglik=True)
        loss, grad = ec.listwise_dpo_loss_and_grad(args["p"], args["r"], args["off"], args["w"],
                                                   beta=1.5, n_ranked=args["nr"],
                                                   reduction="weighted_mean")
        ll = ec.listwise_loglik(args["p"], args["r"], args["off"], beta=1.5, n_ranked=args["nr"])
        return [e.responsibilities, e.annotator_loglik, e.record_loglik, torch.tensor(e.loglik),
                grad, torch.tensor(loss), ll]

    return run


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic_run_to_run(dtype):
    run = _run_all(7, dtype)
    first = run()
    for _ in range(3):
        again = run()
        for a, b in zip(first, again):
            assert torch.equal(a, b), "results differ between runs"


@gpu
def test_side_stream_gives_same_results():
    run = _run_all(8, "float32")
    default = run()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        side = run()
    stream.synchronize()
    for a, b in zip(default, side):
        assert torch.equal(a, b)


def _non_finite_case(rng, dtype):
    N, K = 700, 3
    p, r, off, nr = make_records(rng, N, K, "top_l", dtype)
    first, later = 301, 650
    p[2, off[later]] = np.nan
    r[off[first] + 1] = np.inf
    return p, r, off, nr, first, K, N


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs_raise_with_first_record(dtype):
    rng = np.random.default_rng(9)
    p, r, off, nr, first, K, N = _non_finite_case(rng, dtype)
    msg = rf"ref_logps: non-finite value inf at slot {off[first] + 1} \(record {first}\)"
    with pytest.raises(ValueError, match=msg):
        ec.listwise_loglik(cuda(p), cuda(r), cuda(off), beta=1.0, n_ranked=cuda(nr))
    with pytest.raises(ValueError, match=msg):
        ec.e_step(cuda(p), cuda(r), cuda(off), [0, 100, N], np.log(np.full(K, 1 / K)), beta=1.0,
                  n_ranked=cuda(nr))
    with pytest.raises(ValueError, match=msg):
        ec.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), beta=1.0, n_ranked=cuda(nr))
    r[off[first] + 1] = 0.0
    p[0, 5] = -np.inf  # record 0 or 1 now comes first
    rec0 = int(np.searchsorted(off, 5, side="right") - 1)
    with pytest.raises(ValueError, match=rf"policy_logps: non-finite value -inf at \[type 0, "
                                         rf"slot 5\] \(record {rec0}\)"):
        ec.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), beta=1.0, n_ranked=cuda(nr))


@gpu
def test_reward_overflow_raises():
    p = np.array([3e38, 0.0, 1.0, 0.0], dtype=np.float32)
    r = np.array([-3e38, 0.0, 0.0, 0.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"overflows in record 0"):
        ec.listwise_loglik(cuda(p), cuda(r), cuda(np.array([0, 2, 4])), beta=1.0)


@gpu
def test_bad_weights_raise():
    rng = np.random.default_rng(10)
    p, r, off, _ = make_records(rng, 50, 2, "pairs", "float32")
    w = np.ones((2, 50), np.float32)
    w[1, 7] = np.nan
    with pytest.raises(ValueError, match=r"weights: expected finite values, got nan at index "
                                         r"\(1, 7\)"):
        ec.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), cuda(w), beta=1.0)
    with pytest.raises(ValueError, match="record_weights: expected finite values >= 0"):
        ec.e_step(cuda(p), cuda(r), cuda(off), [0, 50], [0.0, 0.0], beta=1.0,
                  record_weights=cuda(-np.ones(50)))


@gpu
def test_mixed_devices_raise():
    rng = np.random.default_rng(11)
    p, r, off, nr = make_records(rng, 20, 2, "top_l", "float64")
    with pytest.raises(ValueError, match=r"ref_logps: on cpu, but policy_logps is on cuda"):
        ec.listwise_loglik(cuda(p), torch.from_numpy(r), cuda(off), beta=1.0)
    with pytest.raises(ValueError, match=r"offsets: on cpu"):
        ec.e_step(cuda(p), cuda(r), torch.from_numpy(off), [0, 20], [0.0, 0.0], beta=1.0)
    with pytest.raises(ValueError, match=r"weights: on cpu"):
        ec.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), torch.ones(2, 20), beta=1.0)
    with pytest.raises(ValueError, match=r"ref_logps: on cuda:0, but policy_logps is on cpu"):
        ec.listwise_loglik(torch.from_numpy(p), cuda(r), off, beta=1.0)


@gpu
def test_invalid_layout_raises_even_after_a_valid_one_was_freed():
    # The validation cache must not let a new tensor at a freed tensor's address through.
    rng = np.random.default_rng(12)
    p, r, off, _ = make_records(rng, 64, 1, "pairs", "float64")
    ec.listwise_loglik(cuda(p), cuda(r), cuda(off), beta=1.0)  # checked, then freed
    bad = off.copy()
    bad[10] = bad[11]  # record 10 now has no responses
    with pytest.raises(ValueError, match="offsets"):
        ec.listwise_loglik(cuda(p), cuda(r), cuda(bad), beta=1.0)
    with pytest.raises(ValueError, match="annotator_offsets"):
        ec.e_step(cuda(p), cuda(r), cuda(off), cuda(np.array([0, 70])), [0.0], beta=1.0)


# ----------------------------------------------------------------------------------------
# Any machine


_CHILD = textwrap.dedent("""
    import numpy as np, emdpo_core as ec
    info = ec.build_info()
    assert isinstance(info["cuda"], bool) and info["version"] == ec.__version__, info
    if info["cuda"]:
        assert info["cuda_compiler"] and info["cuda_architectures"], info
    # the NumPy path runs without a device
    out = ec.listwise_loglik(np.array([0.0, -1.0, -2.0]), np.zeros(3), [0, 3], beta=1.0)
    want = -(np.log(1 + np.exp(-1.0) + np.exp(-2.0)) + np.log(1 + np.exp(-1.0)))
    assert abs(out[0, 0] - want) < 1e-12, out
    print("cuda", info["cuda"])
    if info["cuda"]:
        # Launching with no visible device raises (naming the kernel) instead of crashing.
        # Nothing is launched, so the made-up pointers are never touched.
        from emdpo_core import _core
        try:
            _core.cuda_listwise_loglik("float64", 256, 256, 256, 0, 1, 2, 1, 1.0, 256, 256, 0)
        except RuntimeError as e:
            assert "listwise_loglik" in str(e), e
            print("raised", e)
        else:
            raise AssertionError("a CUDA launch without a device did not raise")
""")


def test_build_imports_and_reports_without_a_device():
    """CUDA_VISIBLE_DEVICES="" hides every GPU, so this is the CPU-only-runtime case on any
    machine (here there may be no driver at all: cudart is linked statically)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(ec.__file__))))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"cuda {bool(_core.cuda)}" in proc.stdout
    if _core.cuda:
        assert "raised emdpo_core CUDA kernel listwise_loglik failed" in proc.stdout


@needs_torch
def test_cpu_only_build_refuses_cuda_tensors_with_rebuild_instructions(monkeypatch):
    """Simulates a build without CUDA receiving CUDA tensors: _core.cuda is False and the
    inputs report a CUDA device (no GPU needed)."""
    from emdpo_core.ops import _torch as _torch_dispatch

    real_prepare = _torch_dispatch._prepare

    def on_fake_cuda(policy_logps, ref_logps):
        p, r, one, _ = real_prepare(policy_logps, ref_logps)
        return p, r, one, torch.device("cuda", 0)

    monkeypatch.setattr(_torch_dispatch, "_prepare", on_fake_cuda)
    monkeypatch.setattr(_core, "cuda", False)
    p, r, off = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), [0, 2, 4]
    calls = [
        lambda: ec.listwise_loglik(p, r, off, beta=1.0),
        lambda: ec.e_step(p, r, off, [0, 2], [0.0, 0.0], beta=1.0),
        lambda: ec.listwise_dpo_loss_and_grad(p, r, off, beta=1.0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"built without CUDA.*EMDPO_WITH_CUDA=ON"):
            call()


@needs_torch
def test_other_devices_are_refused():
    p = torch.zeros(2, 4, dtype=torch.float64, device="meta")
    r = torch.zeros(4, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"tensors on meta are not supported"):
        ec.listwise_loglik(p, r, torch.tensor([0, 2, 4], device="meta"), beta=1.0)


@needs_torch
def test_validation_cache_only_hits_for_the_checked_tensors():
    from emdpo_core.ops._torch import _check_cached

    calls = []
    key = ("test_validation_cache", 1)
    a = torch.arange(3)
    _check_cached(key, lambda: calls.append("a"), (a, None))
    _check_cached(key, lambda: calls.append("a again"), (a, None))
    assert calls == ["a"]
    b = torch.arange(3)  # a different tensor under the same key (as after a is freed and
    _check_cached(key, lambda: calls.append("b"), (b, None))  # b reuses its memory)
    assert calls == ["a", "b"]
    with pytest.raises(ValueError):  # a failing check is not remembered
        _check_cached(key, lambda: (_ for _ in ()).throw(ValueError("bad")), (a, None))
    _check_cached(key, lambda: calls.append("a re-checked"), (a, None))
    assert calls == ["a", "b", "a re-checked"]


@pytest.mark.skipif(not _core.cuda, reason="emdpo_core was built without CUDA")
def test_workspace_sizes_are_computable_upper_bounds():
    """Workspace sizes depend only on (N, H, K) and grow with them; a too small workspace
    is refused before anything is launched (so this needs no device). Up to 8 types the
    tile kernel finishes the annotators, so the workspace holds a few values per tile of 256
    records and none per annotator; with more types it holds S (H, K) in float64."""
    e = _core.cuda_e_step_workspace_bytes
    assert e(1, 1, 1) > 0
    assert e(10**6, 1, 8) >= e(10**5, 1, 8)
    assert e(10**6, 10**6, 8) == e(10**6, 1, 8)  # nothing per annotator
    assert e(10**6, 10**6, 8) < 10**6 // 256 * 8 * (3 * 8 + 4) + 4096
    assert e(10**6, 10**6, 9) >= e(10**6, 1, 9) + 10**6 * 9 * 8
    assert _core.cuda_loss_workspace_bytes(10**6, 8) >= 10**6 // 256 * 8
    with pytest.raises(ValueError, match="workspace"):
        _core.cuda_e_step("float64", 1, 1, 1, 0, 0, 1, 1, 5, 10, 2, 3, 1.0, 1, 1, 1, 0, 1, 1,
                          0, 0)


# ----------------------------------------------------------------------------------------
# The torch layer: annotator weights and type totals, and errors read without a host sync


@needs_torch
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_e_step_annotator_weights_and_type_totals(device):
    """ops._torch.e_step passes annotator weights to the kernels and returns their type
    totals (CPU tensors: the CPU kernel; CUDA tensors: the CUDA kernel, which weighs and sums
    on the device) and matches the reference; log weights given as a tensor on the device
    are used there."""
    if device == "cuda" and _GPU_SKIP is not None:
        pytest.skip(str(_GPU_SKIP))
    from emdpo_core.ops import _torch as tops
    rng = np.random.default_rng(161)
    N, K = 900, 5
    p, r, off, nr = make_records(rng, N, K, "top_l", "float64", logp_scale=1.0)
    ao = make_annotators(rng, N, "with_empty")
    H = len(ao) - 1
    log_w = np.log(rng.dirichlet(np.ones(K)))
    v = rng.uniform(0.0, 3.0, H)
    t = (lambda x: torch.as_tensor(np.ascontiguousarray(x), device=device))
    res = tops.e_step(t(p), t(r), t(off), t(ao), t(log_w), beta=0.8, n_ranked=t(nr),
                      annotator_weights=t(v))
    tt = res.type_totals
    assert tt.device.type == device
    resp, loglik, S = reference.e_step(p, r, off, ao, log_w, beta=0.8, n_ranked=nr,
                                       annotator_weights=v)
    assert_close(res.responsibilities, resp, "float64", "responsibilities")
    assert_close(res.annotator_loglik, S, "float64", "annotator_loglik")
    assert res.loglik == pytest.approx(loglik, rel=1e-10)
    assert_close(tt, reference.e_step_type_totals(resp, v), "float64", "type_totals")
    with pytest.raises(ValueError, match="annotator_weights"):
        bad = v.copy()
        bad[3] = -1.0
        tops.e_step(t(p), t(r), t(off), t(ao), t(log_w), beta=0.8, annotator_weights=t(bad))
    with pytest.raises(ValueError, match="log_weights"):
        tops.e_step(t(p), t(r), t(off), t(ao), t(np.full(K, np.nan)), beta=0.8)
    with pytest.raises(ValueError, match="annotator_weights"):
        tops.e_step(t(p), t(r), t(off), t(ao), log_w, beta=0.8, annotator_weights=t(v[:-1]))


@gpu
def test_loss_errors_are_read_without_a_host_sync():
    """With return_tensors=True the loss call does not read its flags: a non-finite input
    makes the returned loss NaN and the error is raised by check_errors() (or a later call
    whose flags have arrived), naming the record, the weight index or the type."""
    import emdpo_core.torch as et
    from emdpo_core.ops import _torch as tops
    rng = np.random.default_rng(162)
    p, r, off, _ = make_records(rng, 500, 2, "full", "float32")
    w = rng.uniform(0.1, 1.0, (2, 500)).astype(np.float32)
    et.check_errors()  # nothing pending from other tests
    p_bad = p.copy()
    p_bad[1, int(off[123]) + 1] = np.nan
    loss, grad = tops.listwise_dpo_loss_and_grad(cuda(p_bad), cuda(r), cuda(off), cuda(w),
                                                 beta=0.5, return_tensors=True)
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match="record 123"):
        et.check_errors()
    w_bad = w.copy()
    w_bad[1, 7] = np.inf
    loss, _ = tops.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), cuda(w_bad),
                                              beta=0.5, return_tensors=True)
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match=r"weights: .*\(1, 7\)"):
        et.check_errors()
    w_zero = w.copy()
    w_zero[0] = 0.0
    tops.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), cuda(w_zero), beta=0.5,
                                    reduction="weighted_mean", return_tensors=True)
    with pytest.raises(ValueError, match="type 0"):
        et.check_errors()
    # The float-returning form raises at once, with the CPU path's messages.
    with pytest.raises(ValueError, match=r"policy_logps: non-finite value nan at \[type 1"):
        tops.listwise_dpo_loss_and_grad(cuda(p_bad), cuda(r), cuda(off), cuda(w), beta=0.5)
    with pytest.raises(ValueError, match=r"weights: expected finite values, got inf"):
        tops.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), cuda(w_bad), beta=0.5)
    # Valid inputs leave nothing pending and agree with the float form.
    loss_t, _ = tops.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), cuda(w), beta=0.5,
                                                return_tensors=True)
    loss_f, _ = tops.listwise_dpo_loss_and_grad(cuda(p), cuda(r), cuda(off), cuda(w), beta=0.5)
    et.check_errors()
    assert float(loss_t) == loss_f
