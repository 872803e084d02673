"""Shared test helpers: random ragged ranking layouts, the tolerance table and the one devices
list (DEVICES) with its helpers for tests that run on the CPU and on CUDA."""

from __future__ import annotations

import contextlib
import tempfile
import zlib

import numpy as np
import pytest

# Child Python processes run from outside the source tree, so that they import the
# installed package (with its compiled module) rather than the bare emdpo_core/ folder.
SUBPROCESS_CWD = tempfile.gettempdir()

# One tolerance table, keyed by dtype: (rtol, atol) for values and gradients against the
# float64 reference. float64: the kernels do the same arithmetic in another order, so
# agreement is limited by rounding of O(m) terms (~1e-13 relative); 1e-10 leaves margin.
# float32: per-record math runs in float32 (eps 1.2e-7); with sums over up to 300 slots and
# rewards of magnitude ~100 the relative error stays below 1e-5; 1e-4 is the project's bound.
TOL = {
    np.float64: dict(rtol=1e-10, atol=1e-10),
    np.float32: dict(rtol=1e-4, atol=1e-4),
}


def random_layout(rng, n_records, min_len=2, max_len=12, partial=True):
    """Ragged record layout: (offsets (N+1,), n_ranked (N,) or None)."""
    m = rng.integers(min_len, max_len + 1, size=n_records)
    offsets = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    n_ranked = None
    if partial:
        n_ranked = np.array([rng.integers(1, mi) for mi in m], dtype=np.int64)
    return offsets, n_ranked


def random_logps(rng, K, M, dtype=np.float64, center=-40.0, scale=3.0):
    p = rng.normal(center, scale, size=(K, M)).astype(dtype)
    ref = rng.normal(center, scale, size=M).astype(dtype)
    return p, ref


def _record_lengths(rng, N, layout):
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
    m, n_ranked = _record_lengths(rng, N, layout)
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


def segment_sums(values, annotator_offsets):
    """S[h] = sum of values over annotator h's records in float64 (0 for empty annotators).
    reduceat over the non-empty annotators' starts: empty ones have zero width."""
    ao = np.asarray(annotator_offsets)
    nonempty = ao[1:] > ao[:-1]
    S = np.zeros((len(ao) - 1, values.shape[1]))
    S[nonempty] = np.add.reduceat(values, ao[:-1][nonempty], axis=0)
    return S


@pytest.fixture
def seed(request):
    # A fresh seed per test, derived from the test's name: reproducible, never shared.
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def tok():
    """The tiny WordLevel tokenizer of hf_utils (for modules that called require_hf())."""
    from hf_utils import tiny_tokenizer

    return tiny_tokenizer()


# ----------------------------------------------------------------------------------------
# The one devices list. Every test that has a CPU and a CUDA variant is parameterized over
# DEVICES: "cpu" always runs; "cuda" carries the `cuda` marker and skips, with the reason,
# where torch is missing, emdpo_core was built without CUDA or no device is visible
# (benchmarks/device_check.sh fails when it sees these reasons on the GPU machine, so they
# say "no CUDA device" or "without CUDA"). Tests that only exist for CUDA (streams, the
# validation cache, workspaces) take CUDA_ONLY, the same "cuda" entry alone.

try:
    import torch
except ImportError:  # the NumPy path works without torch; the "cuda" entry then skips
    torch = None


def _cuda_skip_reason():
    from emdpo_core import _core

    if not getattr(_core, "cuda", False):
        return ("emdpo_core was built without CUDA (build_info()['cuda'] is False); "
                "rebuild with EMDPO_WITH_CUDA=ON on a machine with nvcc")
    if torch is None:
        return "no CUDA device reachable: torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()


@contextlib.contextmanager
def single_torch_thread():
    """torch's intra-op thread count set to 1 for the block, restored after it.

    The tests' models are tiny: torch's intra-op thread pool only adds synchronization, and
    its idle OpenMP threads spin on the cores that the compiled kernels' threads need (on a
    busy 2-core machine that made a 14 ms M-step take 1.5 s). Results do not depend on it."""
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_torch_thread():
    """single_torch_thread() around a test; a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with single_torch_thread():
        yield
CUDA = pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))])
DEVICES = ["cpu", CUDA]
CUDA_ONLY = [CUDA]


def on(device, x, dtype=None):
    """A test input on ``device``: on "cpu" the NumPy array itself (the NumPy entry points,
    where torch CPU tensors also end up without a copy), on "cuda" a torch tensor there.
    ``dtype`` (a NumPy dtype or its name) converts it first; None passes None through."""
    if x is None:
        return None
    x = np.ascontiguousarray(x if dtype is None else np.asarray(x).astype(dtype))
    return x if device == "cpu" else torch.as_tensor(x, device=device)


def host(x):
    """A result back on the host as a float64 NumPy array (torch tensors of any device)."""
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def device_of(x):
    """"cpu" for NumPy arrays and CPU tensors, "cuda" for CUDA tensors."""
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device.type
    return "cpu"


def assert_close(got, want, dtype, what):
    """``got`` (any device) against the float64 reference ``want`` with TOL[dtype]["rtol"]:
    the same shape, every value finite (an output left unwritten shows up as NaN under
    ``poisoned_outputs``), ||got - want|| / ||want|| <= tol, and elementwise
    |got - want| <= tol |want| + tol min(1, max |want|) (absolute floor tol for values of
    magnitude >= 1, tol relative to the largest |want| for smaller ones such as
    posteriors)."""
    got, want = host(got), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values (an output left unwritten?)"
    tol = TOL[np.dtype(dtype).type]["rtol"]
    scale = float(np.abs(want).max()) if want.size else 0.0
    rel = float(np.linalg.norm(got - want)) / max(float(np.linalg.norm(want)), 1e-300)
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e}"
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * min(1.0, scale), err_msg=what)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every torch.empty (the CUDA dispatch's outputs and workspaces) comes back filled with
    NaN (floats) or 0xFF bytes (integers, the kernels' workspace), so an output or workspace
    entry that a kernel reads or returns without writing it first shows up as a failure
    instead of a lucky zero. The NumPy entry points (the "cpu" entry) do not use it."""
    if torch is None:
        return
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


def dtype_of(x):
    """The NumPy dtype of an array or a torch tensor (torch.float32 -> float32)."""
    return np.dtype(str(x.dtype).split(".")[-1])


def run_all_kernels(rng, device, dtype):
    """Every public kernel on one random problem (5000 records, K = 9, annotators around the
    CUDA tiles); run() returns their outputs on the host."""
    import emdpo_core as ec

    N, K = 5000, 9
    p, r, off, nr = make_records(rng, N, K, "top_l", dtype)
    ao = make_annotators(rng, N, "random")
    args = dict(p=on(device, p), r=on(device, r), off=on(device, off), nr=on(device, nr),
                ao=on(device, ao), c=on(device, rng.uniform(0, 1, N), dtype),
                w=on(device, rng.uniform(0, 1, (K, N)), dtype))
    log_w = np.log(np.full(K, 1.0 / K))

    def run():
        e = ec.e_step(args["p"], args["r"], args["off"], args["ao"], log_w, beta=1.5,
                      n_ranked=args["nr"], record_weights=args["c"], return_record_loglik=True)
        loss, grad = ec.listwise_dpo_loss_and_grad(args["p"], args["r"], args["off"], args["w"],
                                                   beta=1.5, n_ranked=args["nr"],
                                                   reduction="weighted_mean")
        ll = ec.listwise_loglik(args["p"], args["r"], args["off"], beta=1.5, n_ranked=args["nr"])
        return [host(x) for x in (e.responsibilities, e.annotator_loglik, e.record_loglik,
                                  e.loglik, grad, loss, ll)]

    return run
