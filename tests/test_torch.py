"""The PyTorch layer (emdpo_core.torch) against the float64 NumPy reference.

Every case runs on CPU; the "cuda" entry of the one devices list (conftest.DEVICES) skips with
a reason when there is no device or the build has no CUDA kernels. What only CUDA has (streams,
the validation cache, a build without CUDA refusing CUDA tensors) is in test_cuda.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import DEVICES

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import emdpo_core.torch as et  # noqa: E402
from emdpo_core.ops import _reference as ref_impl  # noqa: E402
from emdpo_core.ops import _torch as _torch_dispatch  # noqa: E402


REDUCTIONS = ["sum", "mean", "weighted_mean", "none"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]

# Tolerances against the float64 reference evaluated at the same (rounded) inputs.
TOL = {
    # float64 kernels: only rounding in ~10 exp/log per record; 1e-9 is far above it.
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    # float32: per-record math in float32 (eps 1.2e-7) on rewards up to ~10 in magnitude over
    # lists of up to 6, so ~1e-6 relative; sums over records are in float64.
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    # bfloat16: computed in float32, then the loss and the gradient are rounded to bfloat16
    # (8 significant bits: relative error up to 2^-8 = 3.9e-3).
    torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),  # 11 significant bits: 2^-11 = 4.9e-4
}


def _problem(seed, *, N=17, K=None, dtype=torch.float64, device="cpu", partial=True,
             weighted=True, m_max=6):
    """A random layout with lists of 2..m_max, partial rankings and positive weights.

    Returns tensors on ``device`` in ``dtype`` plus their float64 NumPy values (after the
    rounding to ``dtype``), which the reference sees.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, m_max + 1, size=N)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    M = int(offsets[-1])
    shape = (M,) if K is None else (K, M)
    policy = rng.normal(-3.0, 2.0, size=shape)
    ref = rng.normal(-3.0, 2.0, size=M)
    n_ranked = np.array([rng.integers(1, m) for m in lengths]) if partial else None
    w = rng.uniform(0.1, 2.0, size=(N,) if K is None else (K, N)) if weighted else None
    t = dict(
        policy=torch.tensor(policy, dtype=dtype, device=device),
        ref=torch.tensor(ref, dtype=dtype, device=device),
        offsets=torch.tensor(offsets, device=device),
        n_ranked=None if n_ranked is None else torch.tensor(n_ranked, device=device),
        weights=None if w is None else torch.tensor(w, dtype=dtype, device=device),
    )
    np_ = dict(
        policy=t["policy"].double().cpu().numpy(), ref=t["ref"].double().cpu().numpy(),
        offsets=offsets, n_ranked=n_ranked,
        weights=None if w is None else t["weights"].double().cpu().numpy())
    return t, np_


def _close(actual, expected, dtype):
    np.testing.assert_allclose(actual.detach().double().cpu().numpy(), expected, **TOL[dtype])


# ----------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("K", [None, 3], ids=["one-policy", "K=3"])
def test_values_and_grads_match_reference(device, dtype, reduction, K):
    t, n = _problem(1, K=K, dtype=dtype, device=device)
    beta = 0.7
    policy = t["policy"].clone().requires_grad_()
    loss = et.listwise_dpo_loss(policy, t["ref"], t["offsets"], t["weights"], beta=beta,
                                n_ranked=t["n_ranked"], reduction=reduction)
    expected_loss, expected_grad = ref_impl.listwise_dpo_loss_and_grad(
        n["policy"], n["ref"], n["offsets"], n["weights"], beta=beta, n_ranked=n["n_ranked"],
        reduction=reduction)
    assert loss.dtype == dtype and loss.device.type == device
    _close(loss, expected_loss, dtype)
    if reduction == "none":
        # d/dp sum_i g_i * w_i (-ll_i) is the "sum" gradient with weights g_i * w_i.
        g = torch.tensor(np.random.default_rng(2).normal(size=tuple(loss.shape)), dtype=dtype,
                         device=device)
        loss.backward(g)
        _, expected_grad = ref_impl.listwise_dpo_loss_and_grad(
            n["policy"], n["ref"], n["offsets"], n["weights"] * g.double().cpu().numpy(),
            beta=beta, n_ranked=n["n_ranked"], reduction="sum")
    else:
        assert loss.dim() == 0
        loss.backward()
    assert policy.grad.dtype == dtype and policy.grad.shape == policy.shape
    _close(policy.grad, expected_grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_defaults_are_unit_weights_full_rankings_and_mean(device):
    t, n = _problem(3, device=device, partial=False, weighted=False)
    policy = t["policy"].clone().requires_grad_()
    loss = et.listwise_dpo_loss(policy, t["ref"], t["offsets"], beta=0.3)
    loss.backward()
    expected_loss, expected_grad = ref_impl.listwise_dpo_loss_and_grad(
        n["policy"], n["ref"], n["offsets"], beta=0.3, reduction="mean")
    _close(loss, expected_loss, torch.float64)
    _close(policy.grad, expected_grad, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_weights_broadcast_over_policies(device):
    t, n = _problem(4, K=2, device=device, weighted=False)
    w = torch.linspace(0.5, 1.5, t["offsets"].shape[0] - 1, dtype=torch.float64, device=device)
    shared = et.listwise_dpo_loss(t["policy"], t["ref"], t["offsets"], w, beta=1.0,
                                  n_ranked=t["n_ranked"], reduction="weighted_mean")
    stacked = et.listwise_dpo_loss(t["policy"], t["ref"], t["offsets"], w.expand(2, -1),
                                   beta=1.0, n_ranked=t["n_ranked"], reduction="weighted_mean")
    assert torch.equal(shared, stacked)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(device, reduction):
    t, _ = _problem(5, N=6, K=2, device=device)
    policy = t["policy"].clone().requires_grad_()

    def f(p):
        return et.listwise_dpo_loss(p, t["ref"], t["offsets"], t["weights"], beta=1.3,
                                    n_ranked=t["n_ranked"], reduction=reduction)

    assert torch.autograd.gradcheck(f, (policy,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_is_computed_in_float32_and_returned_in_float16(device):
    t, n = _problem(6, dtype=torch.float16, device=device)
    policy = t["policy"].clone().requires_grad_()
    loss = et.listwise_dpo_loss(policy, t["ref"], t["offsets"], t["weights"], beta=0.5,
                                n_ranked=t["n_ranked"], reduction="sum")
    loss.backward()
    expected_loss, expected_grad = ref_impl.listwise_dpo_loss_and_grad(
        n["policy"], n["ref"], n["offsets"], n["weights"], beta=0.5, n_ranked=n["n_ranked"],
        reduction="sum")
    assert loss.dtype == torch.float16 and policy.grad.dtype == torch.float16
    _close(loss, expected_loss, torch.float16)
    _close(policy.grad, expected_grad, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_like_torch(device):
    t, n = _problem(7, device=device)
    policy = t["policy"].float().requires_grad_()
    loss = et.listwise_dpo_loss(policy, t["ref"], t["offsets"], beta=0.5, reduction="sum")
    assert loss.dtype == torch.float64  # float32 with float64 promotes to float64
    loss.backward()
    assert policy.grad.dtype == torch.float32
    expected_loss, _ = ref_impl.listwise_dpo_loss_and_grad(
        policy.detach().double().cpu().numpy(), n["ref"], n["offsets"], beta=0.5,
        reduction="sum")
    _close(loss, expected_loss, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_log_probabilities_and_long_lists(device):
    # Stable for log-probabilities of -1e4, beta up to 10, lists of hundreds (README.md).
    rng = np.random.default_rng(8)
    lengths = np.array([2, 300, 5, 150])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    M = int(offsets[-1])
    policy = rng.uniform(-1e4, 0.0, size=M)
    ref = rng.uniform(-1e4, 0.0, size=M)
    p = torch.tensor(policy, device=device, requires_grad=True)
    loss = et.listwise_dpo_loss(p, torch.tensor(ref, device=device),
                                torch.tensor(offsets, device=device), beta=10.0,
                                reduction="sum")
    loss.backward()
    expected_loss, expected_grad = ref_impl.listwise_dpo_loss_and_grad(
        policy, ref, offsets, beta=10.0, reduction="sum")
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    # Rewards reach 1e5, so the loss (a sum of reward differences) is ~1e7: relative 1e-9.
    _close(loss, expected_loss, torch.float64)
    _close(p.grad, expected_grad, torch.float64)


# ----------------------------------------------------------------------------------------
# Autograd contract


@pytest.mark.parametrize("device", DEVICES)
def test_ref_and_weights_get_no_gradient(device):
    t, _ = _problem(9, device=device)
    policy = t["policy"].clone().requires_grad_()
    ref = t["ref"].clone().requires_grad_()
    w = t["weights"].clone().requires_grad_()
    loss = et.listwise_dpo_loss(policy, ref, t["offsets"], w, beta=1.0, n_ranked=t["n_ranked"])
    loss.backward()
    assert policy.grad is not None and policy.grad.abs().sum() > 0
    assert ref.grad is None and w.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_without_grad(device):
    t, n = _problem(10, device=device)
    loss = et.listwise_dpo_loss(t["policy"], t["ref"], t["offsets"], beta=1.0)
    assert not loss.requires_grad and loss.grad_fn is None
    with torch.no_grad():
        p = t["policy"].clone().requires_grad_()
        loss2 = et.listwise_dpo_loss(p, t["ref"], t["offsets"], beta=1.0)
    assert not loss2.requires_grad
    assert torch.equal(loss, loss2)


def test_second_derivative_is_refused_not_silently_zero():
    t, _ = _problem(11)
    policy = t["policy"].clone().requires_grad_()
    loss = et.listwise_dpo_loss(policy, t["ref"], t["offsets"], beta=1.0)
    (g,) = torch.autograd.grad(loss, policy, create_graph=True)
    assert not g.requires_grad  # once_differentiable: the gradient is a leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(g.sum(), policy)
    # With an incoming gradient that itself requires grad, autograd raises on use.
    loss = et.listwise_dpo_loss(policy, t["ref"], t["offsets"], beta=1.0)
    seed = torch.ones((), dtype=loss.dtype, requires_grad=True)
    (g,) = torch.autograd.grad(loss, policy, grad_outputs=seed, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    t, _ = _problem(12)
    policy = t["policy"].clone().requires_grad_()
    loss = et.listwise_dpo_loss(policy, t["ref"], t["offsets"], beta=1.0)
    loss.backward(retain_graph=True)
    first = policy.grad.clone()
    loss.backward()
    torch.testing.assert_close(policy.grad, 2 * first, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# Conveniences


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_pairwise_equals_trl_sigmoid_loss(device, dtype, reduction):
    g = torch.Generator().manual_seed(13)
    B = 64
    cols = [(torch.randn(B, generator=g, dtype=torch.float64) * 3 - 20).to(dtype).to(device)
            for _ in range(4)]
    w = torch.rand(B, generator=g, dtype=torch.float64).to(dtype).to(device) + 0.1
    pc, pr = cols[0].clone().requires_grad_(), cols[1].clone().requires_grad_()
    pc2, pr2 = cols[0].clone().requires_grad_(), cols[1].clone().requires_grad_()
    rc, rr = cols[2], cols[3]
    beta = 0.1
    loss = et.pairwise_dpo_loss(pc, pr, rc, rr, beta=beta, weights=w, reduction=reduction)
    # TRL's DPOTrainer, loss_type="sigmoid" (label_smoothing 0), then our weighting.
    per_pair = -F.logsigmoid(beta * ((pc2 - rc) - (pr2 - rr))) * w
    expected = {"sum": per_pair.sum(), "mean": per_pair.mean(),
                "weighted_mean": per_pair.sum() / w.sum(), "none": per_pair}[reduction]
    torch.testing.assert_close(loss, expected, **TOL[dtype])
    grad_out = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    loss.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(pc.grad, pc2.grad, **TOL[dtype])
    torch.testing.assert_close(pr.grad, pr2.grad, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_padded_equals_packed_and_padding_gets_zero_grad(device, reduction):
    t, _ = _problem(14, N=9, device=device)
    offsets = t["offsets"].cpu()
    lengths = offsets[1:] - offsets[:-1]
    B, m_max = lengths.shape[0], int(lengths.max()) + 1  # at least one padded column
    padded = torch.full((B, m_max), float("nan"), dtype=torch.float64)
    padded_ref = torch.full((B, m_max), float("-inf"), dtype=torch.float64)
    for b in range(B):
        a, e = int(offsets[b]), int(offsets[b + 1])
        padded[b, :e - a] = t["policy"][a:e].cpu()
        padded_ref[b, :e - a] = t["ref"][a:e].cpu()
    padded = padded.to(device).requires_grad_()
    packed = t["policy"].clone().requires_grad_()
    kw = dict(beta=0.9, n_ranked=t["n_ranked"], reduction=reduction)
    loss_p = et.padded_listwise_dpo_loss(padded, padded_ref.to(device), lengths.to(device),
                                         t["weights"], **kw)
    loss = et.listwise_dpo_loss(packed, t["ref"], t["offsets"], t["weights"], **kw)
    torch.testing.assert_close(loss_p, loss, rtol=0, atol=0)
    grad_out = torch.rand(loss.shape, dtype=torch.float64, device=device)
    loss_p.backward(grad_out)
    loss.backward(grad_out)
    valid = torch.arange(m_max) < lengths[:, None]
    torch.testing.assert_close(padded.grad[valid.to(device)], packed.grad, rtol=0, atol=0)
    assert torch.all(padded.grad[~valid.to(device)] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_with_full_rows_needs_no_gather(device):
    t, _ = _problem(15, N=8, device=device, partial=False, m_max=4)
    g = torch.Generator().manual_seed(15)
    policy = (torch.randn(8, 4, generator=g, dtype=torch.float64) - 3).to(device)
    ref = (torch.randn(8, 4, generator=g, dtype=torch.float64) - 3).to(device)
    p1, p2 = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    lengths = torch.full((8,), 4, device=device)
    loss_p = et.padded_listwise_dpo_loss(p1, ref, lengths, beta=0.5)
    loss = et.listwise_dpo_loss(p2.reshape(-1), ref.reshape(-1),
                                torch.arange(0, 33, 4, device=device), beta=0.5)
    loss_p.backward()
    loss.backward()
    torch.testing.assert_close(loss_p, loss, rtol=0, atol=0)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixture_equals_sum_of_single_policy_losses_in_one_launch(device, reduction,
                                                                   monkeypatch):
    K = 3
    t, n = _problem(16, K=K, device=device, weighted=False)
    N = t["offsets"].shape[0] - 1
    g = torch.Generator().manual_seed(16)
    resp = torch.softmax(torch.randn(N, K, generator=g, dtype=torch.float64), dim=1).to(device)
    policy = t["policy"].clone().requires_grad_()
    calls = []
    inner = _torch_dispatch.listwise_dpo_loss_and_grad

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(_torch_dispatch, "listwise_dpo_loss_and_grad", counting)
    kw = dict(beta=0.8, n_ranked=t["n_ranked"], reduction=reduction)
    loss = et.mixture_dpo_loss(policy, t["ref"], t["offsets"], resp, **kw)
    assert len(calls) == 1
    monkeypatch.undo()
    loss_w = et.mixture_dpo_loss(t["policy"], t["ref"], t["offsets"], weights=resp.t(), **kw)
    torch.testing.assert_close(loss, loss_w, rtol=0, atol=0)

    singles = [t["policy"][k].clone().requires_grad_() for k in range(K)]
    per_type = [et.listwise_dpo_loss(singles[k], t["ref"], t["offsets"], resp[:, k], **kw)
                for k in range(K)]
    expected = torch.stack(per_type) if reduction == "none" else sum(per_type)
    torch.testing.assert_close(loss, expected, **TOL[torch.float64])
    grad_out = torch.rand(loss.shape, dtype=torch.float64, device=device)
    loss.backward(grad_out)
    expected.backward(grad_out)
    for k in range(K):
        torch.testing.assert_close(policy.grad[k], singles[k].grad, **TOL[torch.float64])


def test_module_equals_function():
    t, _ = _problem(17, K=2)
    crit = et.ListwiseDPOLoss(beta=0.25, reduction="weighted_mean")
    assert "beta=0.25" in repr(crit) and "weighted_mean" in repr(crit)
    a = crit(t["policy"], t["ref"], t["offsets"], t["weights"], n_ranked=t["n_ranked"])
    b = et.listwise_dpo_loss(t["policy"], t["ref"], t["offsets"], t["weights"], beta=0.25,
                             n_ranked=t["n_ranked"], reduction="weighted_mean")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# Errors


def _small():
    return (torch.tensor([-1.0, -2.0, -3.0, -1.0, -2.0], dtype=torch.float64),
            torch.full((5,), -2.0, dtype=torch.float64), torch.tensor([0, 3, 5]))


@pytest.mark.parametrize("call, exc, match", [
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o, beta=0.0), ValueError, "beta"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o, beta="1"), TypeError, "beta"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o, beta=1.0, reduction="avg"), ValueError,
     "reduction: expected one of"),
    (lambda p, r, o: et.listwise_dpo_loss(p.numpy(), r, o, beta=1.0), TypeError,
     "policy_logps: expected a torch.Tensor"),
    (lambda p, r, o: et.listwise_dpo_loss(p.long(), r, o, beta=1.0), TypeError,
     "policy_logps: expected a floating-point tensor"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r[:4], o, beta=1.0), ValueError,
     r"ref_logps: expected shape \(5,\)"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, torch.tensor([0, 1, 5]), beta=1.0), ValueError,
     "offsets: every list needs at least 2 responses"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, torch.tensor([0, 2, 4]), beta=1.0), ValueError,
     r"offsets: expected offsets\[-1\] == M"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o.double(), beta=1.0), TypeError,
     "offsets: expected an integer tensor"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o, beta=1.0, n_ranked=[1, 2]), ValueError,
     "n_ranked: record 1 has m=2 candidates and n_ranked=2; expected 1 <= n_ranked"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o, torch.ones(3), beta=1.0), ValueError,
     r"weights: expected shape \(2,\)"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o, torch.tensor([1.0, float("inf")]),
                                          beta=1.0), ValueError, "weights: expected finite"),
    (lambda p, r, o: et.listwise_dpo_loss(p, r, o, torch.zeros(2), beta=1.0,
                                          reduction="weighted_mean"), ValueError,
     "positive sum of weights"),
    (lambda p, r, o: et.listwise_dpo_loss(torch.cat([p[:3], p[3:4] * float("nan"), p[4:]]), r,
                                          o, beta=1.0), ValueError,
     r"policy_logps: non-finite value nan at \[type 0, slot 3\] \(record 1\)"),
    (lambda p, r, o: et.pairwise_dpo_loss(p, p[:4], p, p, beta=1.0), ValueError,
     r"rejected_logps: expected shape \(5,\)"),
    (lambda p, r, o: et.padded_listwise_dpo_loss(p.reshape(1, 5), r.reshape(1, 5), [6],
                                                 beta=1.0), ValueError,
     r"lengths: expected 2 <= lengths\[i\] <= m_max = 5, got lengths\[0\] = 6"),
    (lambda p, r, o: et.padded_listwise_dpo_loss(p, r, [5], beta=1.0), ValueError,
     r"policy_logps: expected shape \(B, m_max\)"),
    (lambda p, r, o: et.mixture_dpo_loss(p[None], r, o, beta=1.0), ValueError,
     "pass exactly one of responsibilities"),
    (lambda p, r, o: et.mixture_dpo_loss(p[None], r, o, torch.ones(2, 2), beta=1.0),
     ValueError, r"responsibilities: expected shape \(2, 1\)"),
    (lambda p, r, o: et.mixture_dpo_loss(p, r, o, torch.ones(2, 1), beta=1.0), ValueError,
     r"policy_logps: expected shape \(K, M\)"),
    (lambda p, r, o: et.ListwiseDPOLoss(beta=-1.0), ValueError, "beta"),
])
def test_errors_name_the_argument(call, exc, match):
    p, r, o = _small()
    with pytest.raises(exc, match=match):
        call(p, r, o)


def test_tensors_on_different_devices_raise():
    p, r, o = _small()
    with pytest.raises(ValueError, match="ref_logps: on meta, but policy_logps is on cpu"):
        et.listwise_dpo_loss(p, r.to("meta"), o, beta=1.0)
    with pytest.raises(ValueError, match="offsets: on meta"):
        et.listwise_dpo_loss(p, r, o.to("meta"), beta=1.0)
    with pytest.raises(ValueError, match="weights: on meta"):
        et.listwise_dpo_loss(p, r, o, torch.ones(2, device="meta"), beta=1.0)
    with pytest.raises(ValueError, match="policy_logps: expected a CPU or CUDA tensor"):
        et.listwise_dpo_loss(p.to("meta"), r.to("meta"), o.to("meta"), beta=1.0)


def test_import_emdpo_core_does_not_import_torch():
    code = "import sys, emdpo_core; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/")
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------
# Training and torch.compile


def test_training_a_tabular_policy_recovers_planted_worths():
    """Adam on nn.Parameter logits over 10 items, rankings of 4 sampled from Plackett-Luce.

    With uniform pi_ref and beta = 1 the rewards are the log-worths (up to a constant), so the
    loss minimiser is the Plackett-Luce MLE. Sample size: with equal worths, a full ranking of
    m = 4 items gives an item present in it Fisher information sum_{s=2..4} (s/m)(1/s)(1-1/s)
    = 0.48 about its log-worth, and an item is in a record with probability 4/10, so the MLE has
    variance about 1/(0.19 N) per log-worth: 0.0013 at N = 4000 (measured over 100 seeds:
    0.0014). Planted log-worths spread evenly over [-1.5, 1.5] (variance 1.0) give an expected
    correlation of about 1/sqrt(1 + 0.0013) = 0.9993; 0.97 would need a variance of 0.06, 45x
    the expected one. 300 full-batch Adam steps converge (gradient norm < 1e-6).
    """
    n_items, m, N = 10, 4, 4000
    g = torch.Generator().manual_seed(18)
    log_w = torch.linspace(-1.5, 1.5, n_items, dtype=torch.float64)[
        torch.randperm(n_items, generator=g)]
    # Plackett-Luce sampling: sort Gumbel-perturbed log-worths of a random 4-subset.
    subsets = torch.argsort(torch.rand(N, n_items, generator=g), dim=1)[:, :m]
    gumbel = -torch.log(-torch.log(torch.rand(N, m, generator=g, dtype=torch.float64)))
    order = torch.argsort(log_w[subsets] + gumbel, dim=1, descending=True)
    items = torch.gather(subsets, 1, order).reshape(-1)  # best first
    offsets = torch.arange(0, N * m + 1, m)
    ref = torch.full((N * m,), -float(np.log(n_items)))

    logits = torch.nn.Parameter(torch.zeros(n_items))
    opt = torch.optim.Adam([logits], lr=0.1)
    criterion = et.ListwiseDPOLoss(beta=1.0)

    def loss_fn():
        return criterion(torch.log_softmax(logits, dim=0)[items], ref, offsets)

    first = loss_fn().item()
    for _ in range(300):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    (grad,) = torch.autograd.grad(loss_fn(), logits)
    assert loss_fn().item() < first
    assert grad.norm() < 1e-5
    learned = logits.detach().double()
    corr_log = np.corrcoef(learned.numpy(), log_w.numpy())[0, 1]
    corr = np.corrcoef(torch.softmax(learned, 0).numpy(), torch.softmax(log_w, 0).numpy())[0, 1]
    assert corr_log > 0.97 and corr > 0.97, (corr_log, corr)


def _compile_case():
    g = torch.Generator().manual_seed(19)
    items = torch.randint(0, 10, (40,), generator=g)
    offsets = torch.tensor([0, 4, 7, 9, 15, 20, 24, 30, 33, 40])
    ref = torch.full((40,), -2.3)
    weights = torch.rand(9, generator=g)

    def step(logits):
        # Work on both sides of the kernel call, so dynamo compiles graphs around the break.
        p = torch.log_softmax(logits * 2.0, 0)[items]
        loss = et.listwise_dpo_loss(p, ref, offsets, weights, beta=0.5,
                                    reduction="weighted_mean")
        return loss * 3.0 + logits.square().sum()

    return step, torch.randn(10, generator=g)


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.slow),  # ~15 s of C++ compilation on 2 cores
])
def test_torch_compile_falls_back_cleanly_and_equals_eager(backend):
    step, x = _compile_case()
    torch._dynamo.reset()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(step, backend=backend)
    out_c = compiled(x1)
    out_e = step(x2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)
    # Calling again reuses the compiled graphs and still agrees.
    torch.testing.assert_close(compiled(x.clone()), step(x.clone()))
    torch._dynamo.reset()
