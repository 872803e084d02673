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


@pytest.mark.parametrize("scale", [1e-300, 1e-310, 2.0 ** -1074, 1e300])
def test_weighted_mean_is_scale_invariant_float64(rng, scale):
    offsets, n_ranked = random_layout(rng, 30)
    p, r = random_logps(rng, 3, offsets[-1])
    # Powers of two times small integers: exact after scaling by any power of two.
    w = rng.integers(0, 4, (3, 30)).astype(np.float64)
    w[:, 0] = 1.0
    kw = dict(beta=0.7, n_ranked=n_ranked, reduction="weighted_mean")
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
