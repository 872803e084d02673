"""Vectorized PyTorch implementations of the kernels: the baseline the benchmarks measure
against (``emdpo bench`` and the scripts under benchmarks/ import this one copy).

This is what a competent PyTorch user would write without a custom kernel. Lists are padded
to (K, N, m_max) through a gather index built once from the offsets (as a trainer with a
fixed layout would cache it); suffix log-sum-exps come from logcumsumexp on the flipped
rewards; per-annotator sums from index_add_; gradients from autograd. Everything runs on the
device of the tensors given (CPU or CUDA).

Example:
    >>> import torch
    >>> from emdpo_core.bench import torch_baseline as tb
    >>> layout = tb.PaddedLayout(torch.tensor([0, 3, 5]))
    >>> p = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.6, 0.4]]))
    >>> ll = tb.listwise_loglik(p, torch.zeros(5), layout, 1.0)   # (K, N) = (1, 2)
    >>> round(float(ll[0, 1]), 4)   # log(0.6 / (0.6 + 0.4))
    -0.5108
"""

from __future__ import annotations

import torch

# Padding enters the suffix log-sum-exps as this reward: exp(_PAD - r) is 0 in float32 and
# float64 for any reward the kernels accept, and, unlike -inf, it keeps logcumsumexp's
# backward free of (-inf) - (-inf) = NaN when lists have different lengths.
_PAD = -1e9


class PaddedLayout:
    """Index tensors for a ragged layout, built once (as a trainer would cache them).

    offsets (N+1,), n_ranked (N,) or None (full rankings). Attributes: N, m_max, index
    (N, m_max) gather index into the flat slots, valid (N, m_max) real slots, ranked
    (N, m_max) ranked positions t < L_i.
    """

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
    """(K, N) Plackett-Luce log-likelihoods ll_ki = sum_{t<L_i} (r_kt - logsumexp_{s>=t} r_ks),
    r = beta * (policy_logps - ref_logps); policy_logps (K, M), ref_logps (M,)."""
    r = beta * (policy_logps - ref_logps)                                  # (K, M)
    R = r[:, layout.index].masked_fill(~layout.valid, _PAD)                # (K, N, m_max)
    lse = torch.logcumsumexp(R.flip(-1), dim=-1).flip(-1)
    terms = torch.where(layout.ranked, R - lse, torch.zeros((), dtype=R.dtype, device=R.device))
    return terms.sum(-1)


def e_step(policy_logps, ref_logps, layout: PaddedLayout, record_annotator, n_annotators,
           log_weights, beta):
    """(responsibilities (H, K), loglik float, annotator_loglik (H, K)) as ec.e_step.
    record_annotator (N,) int64: the annotator of each record; log_weights (K,) float64."""
    ll = listwise_loglik(policy_logps, ref_logps, layout, beta)            # (K, N)
    S = torch.zeros((ll.shape[0], n_annotators), dtype=torch.float64, device=ll.device)
    S.index_add_(1, record_annotator, ll.double())
    v = log_weights[:, None] + S
    lse = torch.logsumexp(v, dim=0)
    return torch.exp(v - lse).T, float(lse.sum()), S.T


def loss_and_grad(policy_logps, ref_logps, layout: PaddedLayout, weights, beta):
    """loss = -sum_ki w_ki ll_ki (reduction "sum") and its gradient with respect to
    policy_logps ((M,) or (K, M)), through autograd. weights (N,) or (K, N)."""
    p = policy_logps.detach().requires_grad_(True)
    ll = listwise_loglik(p[None] if p.dim() == 1 else p, ref_logps, layout, beta)
    loss = -(weights * ll).sum()
    loss.backward()
    return loss.detach(), p.grad


def regret_matrix(sample_logps, sample_ref_logps, source_offsets, *, beta, kind="reward"):
    """(K, K) regret matrix as ec.regret_matrix (unweighted samples), with one index_add_ pass.

    B[k, j] = mean over the samples of policy j of d_k, with d = sample_logps - ref ("reward")
    or d = sample_logps ("kl"); reward: R = beta * (diag(B)[:, None] - B);
    kl: R[k, j] = beta * (B[j, j] - B[k, j]).
    """
    so = torch.as_tensor(source_offsets, dtype=torch.int64, device=sample_logps.device)
    K = sample_logps.shape[0]
    counts = so[1:] - so[:-1]
    source = torch.repeat_interleave(torch.arange(K, device=so.device), counts)
    d = sample_logps - sample_ref_logps if kind == "reward" else sample_logps
    B = torch.zeros((K, K), dtype=torch.float64, device=d.device)
    B.index_add_(1, source, d.double())
    B /= counts.double()
    diag = torch.diagonal(B)
    return beta * (diag[:, None] - B) if kind == "reward" else beta * (diag[None, :] - B)
