"""reduction="weighted_mean" with tiny weights: finite, and equal to the same weights scaled up.

The loss sum_k (sum_i w_ki (-ll_ki)) / (sum_i w_ki) does not change when a type's weights are
multiplied by a constant, which gives exact expectations: weights (1e-320, 0) are (1, 0)
times 1e-320, and float32 responsibilities of 1e-45 (the smallest float32) are ones times it.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES, random_layout, random_logps

import emdpo_core as ec

torch = pytest.importorskip("torch")
import emdpo_core.torch as et  # noqa: E402


def test_subnormal_float64_weights_numpy(rng):
    offsets, n_ranked = random_layout(rng, 2)
    p, r = random_logps(rng, 1, offsets[-1])
    kw = dict(beta=1.0, n_ranked=n_ranked, reduction="weighted_mean")
    tiny = ec.listwise_dpo_loss_and_grad(p[0], r, offsets, [1e-320, 0.0], **kw)
    unit = ec.listwise_dpo_loss_and_grad(p[0], r, offsets, [1.0, 0.0], **kw)
    assert np.isfinite(tiny[0]) and np.all(np.isfinite(tiny[1]))
    assert tiny[0] == unit[0]
    np.testing.assert_array_equal(tiny[1], unit[1])


def scaling_problem(rng, K, N, first):
    """A random weighted_mean problem for the scale-invariance tests: (p, r, offsets, w, kw).
    Weights are small integers 0..3 (powers of two times them are exact), the first record's
    ``first`` for every type, so that no type's weights sum to 0."""
    offsets, n_ranked = random_layout(rng, N)
    p, r = random_logps(rng, K, offsets[-1])
    w = rng.integers(0, 4, (K, N)).astype(np.float64)
    w[:, 0] = first
    return p, r, offsets, w, dict(beta=0.7, n_ranked=n_ranked, reduction="weighted_mean")


@pytest.mark.parametrize("scale", [1e-300, 1e-310, 2.0 ** -1074, 1e300])
def test_weighted_mean_is_scale_invariant_float64(rng, scale):
    # Powers of two times small integers: exact after scaling by any power of two.
    p, r, offsets, w, kw = scaling_problem(rng, K=3, N=30, first=1.0)
    big = ec.listwise_dpo_loss_and_grad(p, r, offsets, w, **kw)
    # 2^-1074 * 3 etc. are exact; 1e-300 and 1e-310 round w * scale, relative 1e-16 (1e-310
    # is subnormal: 1e-310 has 2^-1074 / 1e-310 ~ 5e-14 relative spacing).
    small = ec.listwise_dpo_loss_and_grad(p, r, offsets, w * scale, **kw)
    np.testing.assert_allclose(small[0], big[0], rtol=1e-12)
    np.testing.assert_allclose(small[1], big[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_collapsed_type_float32_responsibilities_torch(rng, device):
    # Type 1 has collapsed: every responsibility is the smallest float32 (1.4e-45). Its sum in
    # float64 is ~4e-44, and 1 / sum = 2.4e43 does not fit in float32.
    offsets, n_ranked = random_layout(rng, 30)
    p, r = random_logps(rng, 2, offsets[-1], np.float32)
    tiny32 = np.float32(np.finfo(np.float32).smallest_subnormal)
    resp = np.stack([rng.uniform(0.5, 1.0, 30), np.ones(30)], axis=1).astype(np.float32)
    collapsed = resp.copy()
    collapsed[:, 1] = tiny32
    out = {}
    for name, g in (("collapsed", collapsed), ("ones", resp)):
        policy = torch.tensor(p, device=device, requires_grad=True)
        loss = et.mixture_dpo_loss(policy, torch.tensor(r, device=device), offsets,
                                   torch.tensor(g, device=device), beta=1.0, n_ranked=n_ranked,
                                   reduction="weighted_mean")
        loss.backward()
        out[name] = (loss.item(), policy.grad.cpu().numpy())
    assert np.isfinite(out["collapsed"][0]) and np.all(np.isfinite(out["collapsed"][1]))
    # Same loss and gradient as responsibilities of one: float32 rounding of the loss (~1e-6).
    np.testing.assert_allclose(out["collapsed"][0], out["ones"][0], rtol=1e-6)
    np.testing.assert_allclose(out["collapsed"][1], out["ones"][1], rtol=1e-5, atol=1e-7)


def test_all_zero_weights_still_raise_naming_the_type():
    with pytest.raises(ValueError, match="weights: .*type 1 sums to 0.0"):
        ec.listwise_dpo_loss_and_grad(np.zeros((2, 4)), np.zeros(4), [0, 2, 4],
                                      [[1.0, 1.0], [0.0, 0.0]], beta=1.0,
                                      reduction="weighted_mean")


def test_pairwise_small_batch_with_subnormal_float32_weights():
    # One pair of weight 2^-149 (the smallest float32) next to a pair of weight 0: the loss is
    # the first pair's, -log sigmoid(margin), as with weights (1, 0).
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0])
    ref = torch.tensor([-2.0, -2.0])
    w = torch.tensor([2.0 ** -149, 0.0], dtype=torch.float32)
    loss = et.pairwise_dpo_loss(pc, pr, ref, ref, beta=0.5, weights=w,
                                reduction="weighted_mean")
    loss.backward()
    want = -torch.nn.functional.logsigmoid(torch.tensor(0.5 * ((-1.0 + 2.0) - (-3.0 + 2.0))))
    np.testing.assert_allclose(loss.item(), want.item(), rtol=1e-6)
    assert torch.isfinite(pc.grad).all() and pc.grad[1] == 0


# The float64 reference and the refusals, consistent across reference, NumPy and torch.

from emdpo_core.ops import _reference as ref_ops  # noqa: E402


@pytest.mark.parametrize("scale", [1e-310, 2.0 ** -1074, 2.0 ** 1021])
def test_reference_weighted_mean_is_scale_invariant(rng, scale):
    # 2^-1074: 1 / sum overflowed; 2^1021 * (up to 3 per record, 20 records): the sum itself
    # overflows. Powers of two times small integers keep the weights exact (1e-310 rounds
    # them, relative 5e-14 at that subnormal spacing, hence rtol 1e-12).
    p, r, offsets, w, kw = scaling_problem(rng, K=2, N=20, first=3.0)
    with np.errstate(all="raise"):            # no overflow, no division by zero
        small = ref_ops.listwise_dpo_loss_and_grad(p, r, offsets, w * scale, **kw)
    unit = ref_ops.listwise_dpo_loss_and_grad(p, r, offsets, w, **kw)
    np.testing.assert_allclose(small[0], unit[0], rtol=1e-12)
    np.testing.assert_allclose(small[1], unit[1], rtol=1e-12, atol=1e-15)
    kernel = ec.listwise_dpo_loss_and_grad(p, r, offsets, w * scale, **kw)
    np.testing.assert_allclose(kernel[0], small[0], rtol=1e-10)
    np.testing.assert_allclose(kernel[1], small[1], rtol=1e-10, atol=1e-12)


A = 2.0 ** 1023
# Weights whose total is not positive: zero, cancelling subnormals, and a negative total whose
# float64 running sum overflows to +inf first (A + A = inf) and used to be taken as positive.
NOT_POSITIVE = {
    "zeros": [0.0, 0.0, 0.0, 0.0, 0.0],
    "cancelling_subnormals": [1e-320, -1e-320, 0.0, 0.0, 0.0],
    "negative_past_overflow": [A, A, -A, -A, -A],
}


@pytest.mark.parametrize("case", sorted(NOT_POSITIVE))
@pytest.mark.parametrize("device", DEVICES)
def test_weighted_mean_refuses_a_total_that_is_not_positive(case, device):
    offsets = np.arange(0, 11, 2)
    p = np.stack([np.linspace(-2, -1, 10), np.linspace(-1, -3, 10)])
    r = np.full(10, -1.5)
    w = np.array([[1.0] * 5, NOT_POSITIVE[case]])
    kw = dict(beta=1.0, reduction="weighted_mean")
    msg = ("weights: reduction='weighted_mean' needs a positive sum of weights for every "
           "type; type 1")
    with pytest.raises(ValueError, match=msg):
        ref_ops.listwise_dpo_loss_and_grad(p, r, offsets, w, **kw)
    if device == "cpu":
        with pytest.raises(ValueError, match=msg):
            ec.listwise_dpo_loss_and_grad(p, r, offsets, w, **kw)
    with pytest.raises(ValueError, match=msg):
        loss = et.listwise_dpo_loss(torch.tensor(p, device=device), torch.tensor(r, device=device),
                                    torch.tensor(offsets, device=device),
                                    torch.tensor(w, device=device), **kw)
        et.check_errors()
        loss.item()


@pytest.mark.parametrize("device", DEVICES)
def test_python_numbers_are_read_as_float64(device):
    # A float64 policy's weights and total_weight given as Python numbers are used exactly:
    # they used to go through float32 (weights rounded, 1e-50 read as 0 and refused).
    rng = np.random.default_rng(5)
    offsets = np.arange(0, 9, 2)
    p = torch.tensor(rng.normal(-2, 1, 8), device=device)
    r = torch.tensor(rng.normal(-2, 1, 8), device=device)
    w = [0.1, 0.2, 0.3, 1e-50]
    w64 = torch.tensor(w, dtype=torch.float64, device=device)
    kw = dict(beta=1.0, reduction="weighted_mean")
    got = et.listwise_dpo_loss(p, r, offsets, w, total_weight=1e-50, **kw)
    want = et.listwise_dpo_loss(p, r, offsets, w64, **kw,
                                total_weight=torch.tensor(1e-50, dtype=torch.float64,
                                                          device=device))
    assert torch.isfinite(got) and got.item() == want.item()
    kw = dict(beta=1.0, reduction="sum")
    assert et.listwise_dpo_loss(p, r, offsets, w, **kw).item() == \
        et.listwise_dpo_loss(p, r, offsets, w64, **kw).item()
    # ref_logps as a list: read in float64 for a float64 policy (no rounding through float32).
    assert et.listwise_dpo_loss(p, r.tolist(), offsets, **kw).item() == \
        et.listwise_dpo_loss(p, r, offsets, **kw).item()
    # The same for the pairwise columns and the mixture loss's responsibilities.
    pc, pr = p[0::2], p[1::2]
    assert et.pairwise_dpo_loss(pc, pr, r[0::2].tolist(), r[1::2].tolist(), weights=w,
                                **kw).item() == \
        et.pairwise_dpo_loss(pc, pr, r[0::2], r[1::2], weights=w64, **kw).item()
    resp = [[0.3, 0.7], [0.1, 0.9], [0.55, 0.45], [0.2, 0.8]]
    P = torch.stack([p, p - 0.5])
    resp64 = torch.tensor(resp, dtype=torch.float64, device=device)
    assert et.mixture_dpo_loss(P, r, offsets, resp, **kw).item() == \
        et.mixture_dpo_loss(P, r, offsets, resp64, **kw).item()


@pytest.mark.parametrize("device", DEVICES)
def test_total_weight_below_float32_range_is_used_as_given(device):
    # A float32 policy, weights 2^-149 (the smallest float32) and total_weight 2^-160 (below
    # float32's range: it used to be read as 0 and refused): w / T = 2^11 exactly, the loss of
    # weights 1 with total_weight 2^-11. A collapsed type's clamped total times a minibatch's
    # share is such a T.
    p = torch.tensor([-1.0, -2.0, -1.5, -1.0], device=device, requires_grad=True)
    r = torch.full((4,), -1.5, device=device)
    w = torch.full((2,), 2.0 ** -149, device=device)
    kw = dict(beta=1.0, reduction="weighted_mean")
    tiny = et.listwise_dpo_loss(p, r, [0, 2, 4], w, total_weight=2.0 ** -160, **kw)
    tiny.backward()
    g_tiny = p.grad.clone()
    p.grad = None
    unit = et.listwise_dpo_loss(p, r, [0, 2, 4], torch.ones(2, device=device),
                                total_weight=2.0 ** -11, **kw)
    unit.backward()
    assert torch.isfinite(tiny) and tiny.item() == unit.item()
    assert torch.equal(g_tiny, p.grad)
