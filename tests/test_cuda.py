"""What only the CUDA path has: streams, mixed devices, the validation cache of CUDA
tensors, errors read without a host synchronisation, and the build's own checks.

The kernels' values, gradients, errors and run-to-run determinism are checked on every
device of the one devices list (conftest.DEVICES) in test_kernels.py, test_torch.py and the
other test files; the tests here take CUDA_ONLY, the same "cuda" entry alone, and skip with
its reason (no CUDA device, or a build without CUDA). The tests at the end run on any
machine: a CUDA build imports and reports itself where there is no device (or no driver), a
build without CUDA refuses CUDA tensors with rebuild instructions, other devices are
refused, and the validation cache of the CUDA path never lets an unchecked tensor through.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import CUDA_ONLY, make_records, on, run_all_kernels

import emdpo_core as ec
from emdpo_core import _core

# The fast subset run against an installed wheel (`pytest -m smoke`, .ci/wheel_smoke.sh).
pytestmark = pytest.mark.smoke

try:
    import torch
except ImportError:  # the NumPy path works without torch; these tests need it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


# ----------------------------------------------------------------------------------------
# CUDA: streams, mixed devices, the validation cache, deferred errors


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_side_stream_gives_same_results(rng, device):
    run = run_all_kernels(rng, device, "float32")
    default = run()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        side = run()
    stream.synchronize()
    for a, b in zip(default, side):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_torch_loss_runs_on_the_current_stream(rng, device):
    """The autograd layer launches on the current stream: forward and backward on a side
    stream give the default stream's loss bitwise (deterministic reductions)."""
    import emdpo_core.torch as et

    p, r, off, nr = make_records(rng, 2000, 2, "top_l", "float64")
    w = rng.uniform(0.1, 2.0, (2, 2000))
    t = {k: on(device, x) for k, x in dict(p=p, r=r, off=off, nr=nr, w=w).items()}
    expected = et.listwise_dpo_loss(t["p"], t["r"], t["off"], t["w"], beta=0.5,
                                    n_ranked=t["nr"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        policy = t["p"].clone().requires_grad_()
        loss = et.listwise_dpo_loss(policy, t["r"], t["off"], t["w"], beta=0.5,
                                    n_ranked=t["nr"])
        loss.backward()
    side.synchronize()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)  # deterministic reductions
    assert torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_mixed_devices_raise(rng, device):
    p, r, off, nr = make_records(rng, 20, 2, "top_l", "float64")
    d = (lambda x: on(device, x))
    with pytest.raises(ValueError, match=r"ref_logps: on cpu, but policy_logps is on cuda"):
        ec.listwise_loglik(d(p), torch.from_numpy(r), d(off), beta=1.0)
    with pytest.raises(ValueError, match=r"offsets: on cpu"):
        ec.e_step(d(p), d(r), torch.from_numpy(off), [0, 20], [0.0, 0.0], beta=1.0)
    with pytest.raises(ValueError, match=r"weights: on cpu"):
        ec.listwise_dpo_loss_and_grad(d(p), d(r), d(off), torch.ones(2, 20), beta=1.0)
    with pytest.raises(ValueError, match=r"ref_logps: on cuda:0, but policy_logps is on cpu"):
        ec.listwise_loglik(torch.from_numpy(p), d(r), off, beta=1.0)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_invalid_layout_raises_even_after_a_valid_one_was_freed(rng, device):
    """The validation cache of CUDA tensors must not let a new tensor at a freed tensor's
    address (the caching allocator hands the block out again) through: through the kernels'
    entry points and through the autograd layer."""
    import emdpo_core.torch as et

    p, r, off, _ = make_records(rng, 64, 1, "pairs", "float64")
    d = (lambda x: on(device, x))
    ec.listwise_loglik(d(p), d(r), d(off), beta=1.0)  # checked, then freed
    bad = off.copy()
    bad[10] = bad[11]  # record 10 now has no responses
    with pytest.raises(ValueError, match="offsets"):
        ec.listwise_loglik(d(p), d(r), d(bad), beta=1.0)
    with pytest.raises(ValueError, match="annotator_offsets"):
        ec.e_step(d(p), d(r), d(off), d(np.array([0, 70])), [0.0], beta=1.0)
    # The autograd layer: a good layout checked and freed, then a bad one most likely in its
    # block.
    pt, rt = d(np.array([-1.0, -2.0, -3.0, -1.0, -2.0])), d(np.full(5, -2.0))
    good = d(np.array([0, 3, 5]))
    et.listwise_dpo_loss(pt, rt, good, beta=1.0)
    del good  # its block goes back to the caching allocator ...
    bad = d(np.array([0, 3, 500]))  # ... and most likely comes back here
    with pytest.raises(ValueError, match="offsets"):
        et.listwise_dpo_loss(pt, rt, bad, beta=1.0)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_loss_errors_are_read_without_a_host_sync(rng, device):
    """With return_tensors=True the loss call does not read its flags: a non-finite input
    makes the returned loss NaN and the error is raised by check_errors() (or a later call
    whose flags have arrived), naming the record, the weight index or the type."""
    import emdpo_core.torch as et
    from emdpo_core.ops import _torch as tops
    p, r, off, _ = make_records(rng, 500, 2, "full", "float32")
    d = (lambda x: on(device, x))
    w = rng.uniform(0.1, 1.0, (2, 500)).astype(np.float32)
    et.check_errors()  # nothing pending from other tests
    p_bad = p.copy()
    p_bad[1, int(off[123]) + 1] = np.nan
    loss, grad = tops.listwise_dpo_loss_and_grad(d(p_bad), d(r), d(off), d(w),
                                                 beta=0.5, return_tensors=True)
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match="record 123"):
        et.check_errors()
    w_bad = w.copy()
    w_bad[1, 7] = np.inf
    loss, _ = tops.listwise_dpo_loss_and_grad(d(p), d(r), d(off), d(w_bad),
                                              beta=0.5, return_tensors=True)
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match=r"weights: .*\(1, 7\)"):
        et.check_errors()
    w_zero = w.copy()
    w_zero[0] = 0.0
    tops.listwise_dpo_loss_and_grad(d(p), d(r), d(off), d(w_zero), beta=0.5,
                                    reduction="weighted_mean", return_tensors=True)
    with pytest.raises(ValueError, match="type 0"):
        et.check_errors()
    # The float-returning form raises at once, with the CPU path's messages.
    with pytest.raises(ValueError, match=r"policy_logps: non-finite value nan at \[type 1"):
        tops.listwise_dpo_loss_and_grad(d(p_bad), d(r), d(off), d(w), beta=0.5)
    with pytest.raises(ValueError, match=r"weights: expected finite values, got inf"):
        tops.listwise_dpo_loss_and_grad(d(p), d(r), d(off), d(w_bad), beta=0.5)
    # Valid inputs leave nothing pending and agree with the float form.
    loss_t, _ = tops.listwise_dpo_loss_and_grad(d(p), d(r), d(off), d(w), beta=0.5,
                                                return_tensors=True)
    loss_f, _ = tops.listwise_dpo_loss_and_grad(d(p), d(r), d(off), d(w), beta=0.5)
    et.check_errors()
    assert float(loss_t) == loss_f


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
    """A build without CUDA receiving CUDA tensors: for real where a device is visible to a
    build without CUDA; everywhere simulated (_core.cuda is False and the inputs report a
    CUDA device, no GPU needed) through the kernels' entry points and the dispatch's check."""
    import emdpo_core.torch as et
    from emdpo_core.ops import _torch as _torch_dispatch

    small = (lambda: (torch.tensor([-1.0, -2.0, -3.0, -1.0, -2.0], dtype=torch.float64),
                      torch.full((5,), -2.0, dtype=torch.float64), torch.tensor([0, 3, 5])))
    if torch.cuda.is_available() and not _core.cuda:
        p, r, o = (x.cuda() for x in small())
        with pytest.raises(RuntimeError, match="EMDPO_WITH_CUDA=ON"):
            et.listwise_dpo_loss(p, r, o, beta=1.0)

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
    with pytest.raises(RuntimeError, match="built without CUDA.*EMDPO_WITH_CUDA=ON"):
        _torch_dispatch._require_cuda_build(torch.device("cuda"))


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


