"""The small-batch CPU path of :mod:`emdpo_core.torch`'s listwise and pairwise losses.

A trainer calls the loss once per micro-batch on a few records; there the Python layers
(argument preparation, the dispatch module's re-checks, tensor wrapping) cost several times
the kernel. This path handles the common case, contiguous float32/float64 CPU tensors of one
dtype and no per-record output, with each argument checked once, then one kernel call on
NumPy views of the tensors. Anything else takes the general path (:func:`listwise` and
:func:`pairwise` return None), and the results are the same (tested bit for bit). Imports
torch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _checks
from .ops import _cpu as _cpu_ops


@functools.lru_cache(maxsize=16)
def _regular_offsets_host(n_records: int, m: int):
    a = np.arange(0, n_records * m + 1, m, dtype=np.int64)
    a.setflags(write=False)
    return a


class _SmallListwiseFunction(torch.autograd.Function):
    """listwise_dpo_loss of one (M,) policy on checked host arrays (the small-batch path)."""

    @staticmethod
    def forward(ctx, policy, ref, offsets, nr, w, reduction, beta):
        loss, grad = _cpu_ops.listwise_dpo_loss_and_grad(
            policy.detach().numpy().reshape(1, -1), ref, offsets, nr, w, reduction, beta)
        if ctx.needs_input_grad[0]:
            ctx.grad = torch.from_numpy(grad.reshape(-1))
        return torch.from_numpy(np.array(loss, dtype=grad.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (ctx.grad * grad_output if ctx.needs_input_grad[0] else None,
                None, None, None, None, None, None)


class _SmallPairwiseFunction(torch.autograd.Function):
    """pairwise_dpo_loss on the small-batch path: the pairs are interleaved into lists of two
    on the host, and the kernel's gradient is split back into the two columns."""

    @staticmethod
    def forward(ctx, chosen, rejected, ref_chosen, ref_rejected, w, reduction, beta):
        B = chosen.shape[0]
        # Pair i is the list of two in slots (2i, 2i+1), chosen first.
        dtype = _NP_DTYPE[chosen.dtype]
        p, ref = np.empty((B, 2), dtype=dtype), np.empty((B, 2), dtype=dtype)
        p[:, 0], p[:, 1] = chosen.detach().numpy(), rejected.detach().numpy()
        ref[:, 0], ref[:, 1] = ref_chosen.detach().numpy(), ref_rejected.detach().numpy()
        loss, grad = _cpu_ops.listwise_dpo_loss_and_grad(
            p.reshape(1, -1), ref.reshape(-1), _regular_offsets_host(B, 2), None, w, reduction,
            beta)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g = torch.from_numpy(grad.reshape(B, 2))
            ctx.grads = (g[:, 0], g[:, 1])
        return torch.from_numpy(np.array(loss, dtype=dtype))     # (cheaper than torch.tensor)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        need = ctx.needs_input_grad
        gc = ctx.grads[0] * grad_output if need[0] else None
        gr = ctx.grads[1] * grad_output if need[1] else None
        return gc, gr, None, None, None, None, None


_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def small_cpu(*tensors) -> bool:
    """Whether the small-batch path takes these tensors: CPU, one float32/float64 dtype,
    contiguous, 1-D, and not being traced by torch.compile (which takes the general path and
    its graph break)."""
    dtype = tensors[0].dtype if type(tensors[0]) is torch.Tensor else None
    if dtype not in _NP_DTYPE:
        return False
    for t in tensors:
        if type(t) is not torch.Tensor or t.dtype != dtype or t.dim() != 1 \
                or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return not _is_compiling()


def _weights(weights, N: int, dtype):
    """Host weights for the small-batch path, or False when it should not take them."""
    if weights is None:
        return None
    if type(weights) is not torch.Tensor or weights.device.type != "cpu" \
            or tuple(weights.shape) != (N,):
        return False                    # the general path converts, or names the problem
    return _checks.check_loss_weights(weights.detach().numpy(), 1, N, _NP_DTYPE[dtype], True)


def listwise(policy, ref, offsets, weights, n_ranked, beta, reduction):
    """The small-batch path of listwise_dpo_loss, or None when it does not apply."""
    if reduction == "none" or not small_cpu(policy, ref) or ref.shape != policy.shape:
        return None
    if type(offsets) is not torch.Tensor or offsets.device.type != "cpu" \
            or offsets.dtype != torch.int64:
        return None
    if n_ranked is not None and (type(n_ranked) is not torch.Tensor
                                 or n_ranked.device.type != "cpu"
                                 or n_ranked.dtype != torch.int64):
        return None
    beta = _checks.check_beta(beta)
    _checks.check_reduction(reduction)
    off, nr = _checks.check_layout(offsets.numpy(), None if n_ranked is None
                                   else n_ranked.numpy(), policy.shape[0])
    w = _weights(weights, off.shape[0] - 1, policy.dtype)
    if w is False:
        return None
    return _SmallListwiseFunction.apply(policy, ref.detach().numpy(), off, nr, w, reduction,
                                        beta)


def pairwise(chosen, rejected, ref_chosen, ref_rejected, weights, beta, reduction):
    """The small-batch path of pairwise_dpo_loss, or None when it does not apply."""
    if reduction == "none" or not small_cpu(chosen, rejected, ref_chosen, ref_rejected):
        return None
    B = chosen.shape[0]
    if B < 1 or rejected.shape[0] != B or ref_chosen.shape[0] != B or ref_rejected.shape[0] != B:
        return None                     # the general path names the bad argument
    beta = _checks.check_beta(beta)
    _checks.check_reduction(reduction)
    w = _weights(weights, B, chosen.dtype)
    if w is False:
        return None
    return _SmallPairwiseFunction.apply(chosen, rejected, ref_chosen, ref_rejected, w,
                                        reduction, beta)

