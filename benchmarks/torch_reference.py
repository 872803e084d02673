"""Vectorized PyTorch implementations of the kernels: the baseline the benchmarks measure
against. Lists are padded to (K, N, m_max); suffix log-sum-exps come from logcumsumexp on the
flipped rewards; per-annotator sums from index_add_; gradients from autograd. This is what a
competent PyTorch user would write without a custom kernel.
"""

from __future__ import annotations

import torch


class PaddedLayout:
    """Index tensors for a ragged layout, built once (as a trainer would cache them)."""

    def __init__(self, offsets, n_ranked=None, device="cpu"):
        offsets = torch.as_tensor(offsets, dtype=torch.int64, device=device)
        lengths = offsets[1:] - offsets[:-1]
        self.N = lengths.numel()
        self.m_max = int(lengths.max())
        pos = torch.arange(self.m_max, device=device)
        self.valid = pos[None, :] < lengths[:, None]                       # (N, m_max)
        self.index = torch.where(self.valid, offsets[:-1, None] + pos[None, :], 0)
        L = lengths - 1 if n_ranked is None else torch.as_tensor(n_ranked, device=device)
        self.ranked = pos[None, :] < L[:, None]                            # (N, m_max)


def listwise_loglik(policy_logps, ref_logps, layout: PaddedLayout, beta):
    """(K, N) log-likelihoods."""
    r = beta * (policy_logps - ref_logps)                                  # (K, M)
    R = r[:, layout.index].masked_fill(~layout.valid, float("-inf"))       # (K, N, m_max)
    lse = torch.logcumsumexp(R.flip(-1), dim=-1).flip(-1)
    terms = torch.where(layout.ranked, R - lse, torch.zeros((), dtype=R.dtype, device=R.device))
    return terms.sum(-1)


def e_step(policy_logps, ref_logps, layout: PaddedLayout, record_annotator, n_annotators,
           log_weights, beta):
    ll = listwise_loglik(policy_logps, ref_logps, layout, beta)            # (K, N)
    S = torch.zeros((ll.shape[0], n_annotators), dtype=torch.float64, device=ll.device)
    S.index_add_(1, record_annotator, ll.double())
    v = log_weights[:, None] + S
    lse = torch.logsumexp(v, dim=0)
    return torch.exp(v - lse).T, float(lse.sum()), S.T


def loss_and_grad(policy_logps, ref_logps, layout: PaddedLayout, weights, beta):
    p = policy_logps.detach().requires_grad_(True)
    ll = listwise_loglik(p[None] if p.dim() == 1 else p, ref_logps, layout, beta)
    loss = -(weights * ll).sum()
    loss.backward()
    return loss.detach(), p.grad
