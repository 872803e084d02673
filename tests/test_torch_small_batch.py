"""The small-batch CPU path of listwise_dpo_loss / pairwise_dpo_loss gives bitwise the same
losses and gradients as the general path, and the same errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import emdpo_core._torch_small_batch as small_batch  # noqa: E402
import emdpo_core.torch as et  # noqa: E402


def _general(monkeypatch):
    # The listwise and pairwise small paths ask small_cpu whether they apply.
    monkeypatch.setattr(small_batch, "small_cpu", lambda *t: False)


def _run(fn, *leaves):
    for x in leaves:
        x.grad = None
    loss = fn()
    loss.backward()
    return loss.detach().clone(), [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted_mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pairwise_small_path_matches_general(rng, monkeypatch, dtype, reduction, weighted):
    B = int(rng.integers(1, 20))
    cols = [torch.tensor(rng.normal(-40, 3, B), dtype=dtype) for _ in range(4)]
    pc, pr = cols[0].requires_grad_(), cols[1].requires_grad_()
    w = torch.tensor(rng.uniform(0.1, 2, B), dtype=dtype) if weighted else None

    def loss():
        return et.pairwise_dpo_loss(pc, pr, cols[2], cols[3], beta=0.7, weights=w,
                                    reduction=reduction)

    assert small_batch.small_cpu(pc, pr, cols[2], cols[3])
    fast = _run(loss, pc, pr)
    _general(monkeypatch)
    slow = _run(loss, pc, pr)
    assert fast[0].dtype == slow[0].dtype == dtype
    assert torch.equal(fast[0], slow[0])
    for a, b in zip(fast[1], slow[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted_mean"])
def test_listwise_small_path_matches_general(rng, monkeypatch, dtype, reduction):
    m = rng.integers(2, 6, size=int(rng.integers(1, 12)))
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(m)]))
    n_ranked = torch.tensor([int(rng.integers(1, k)) for k in m])
    M = int(offsets[-1])
    policy = torch.tensor(rng.normal(-40, 3, M), dtype=dtype, requires_grad=True)
    ref = torch.tensor(rng.normal(-40, 3, M), dtype=dtype)
    w = torch.tensor(rng.uniform(0.1, 2, len(m)), dtype=dtype)

    def loss():
        return et.listwise_dpo_loss(policy, ref, offsets, w, beta=2.0, n_ranked=n_ranked,
                                    reduction=reduction)

    fast = _run(loss, policy)
    _general(monkeypatch)
    slow = _run(loss, policy)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1][0], slow[1][0])


def test_small_path_errors_match_general(monkeypatch):
    ok = torch.zeros(4)
    bad = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    cases = [
        (lambda: et.pairwise_dpo_loss(bad, ok, ok, ok, beta=0.1), ValueError),
        (lambda: et.pairwise_dpo_loss(ok, ok, ok, ok, beta=-1.0), ValueError),
        (lambda: et.pairwise_dpo_loss(ok, ok, ok, ok, beta=0.1, weights=torch.ones(3)),
         ValueError),
        (lambda: et.pairwise_dpo_loss(ok, ok, ok, ok, beta=0.1, reduction="median"),
         ValueError),
        (lambda: et.listwise_dpo_loss(ok, ok, torch.tensor([0, 3, 4]), beta=0.1,
                                      n_ranked=torch.tensor([3, 1])), ValueError),
        (lambda: et.listwise_dpo_loss(ok, ok, torch.tensor([0, 1, 4]), beta=0.1), ValueError),
        (lambda: et.listwise_dpo_loss(ok, bad, torch.tensor([0, 2, 4]), beta=0.1), ValueError),
    ]
    messages = []
    for fn, exc in cases:
        with pytest.raises(exc) as e:
            fn()
        messages.append(str(e.value))
    _general(monkeypatch)
    for (fn, exc), fast_message in zip(cases, messages):
        with pytest.raises(exc) as e:
            fn()
        assert str(e.value) == fast_message


def test_other_inputs_take_the_general_path():
    x = torch.zeros(4)
    assert not small_batch.small_cpu(x.half(), x.half(), x.half(), x.half())
    assert not small_batch.small_cpu(torch.zeros(8)[::2], x, x, x)          # not contiguous
    assert not small_batch.small_cpu(x, x.double(), x, x)                   # mixed dtypes
    assert not small_batch.small_cpu(x, np.zeros(4), x, x)                  # not a tensor
    # Still correct through the general path.
    h = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    loss = et.pairwise_dpo_loss(h, h.detach(), h.detach(), h.detach(), beta=1.0)
    assert abs(float(loss.detach()) - np.log(2)) < 1e-3
