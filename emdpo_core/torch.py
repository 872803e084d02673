"""PyTorch autograd layer over the fused listwise DPO kernels (CPU and CUDA).

``import emdpo_core.torch`` (torch is never imported by ``import emdpo_core``).

The loss of K policies over N ranked lists (docs/math.md), with implicit rewards
r_kj = beta * (logpi_k(y_j) - logpi_ref(y_j)) and the Plackett-Luce log-likelihood of record
i under policy k, ll_ki = sum_{t < L_i} (r_kt - logsumexp_{s >= t} r_ks):

    loss = sum_k scale_k * sum_i w_ki * (-ll_ki),
    scale_k = 1 ("sum"), 1/N ("mean"), 1/T_k ("weighted_mean");
    reduction="none" returns the per-record losses w_ki * (-ll_ki), shape (N,) or (K, N).

T_k is ``total_weight[k]`` when given, else sum_i w_ki over the records of this call. A
minibatch M-step passes each type's total weight over all records of the M-step (times the
minibatch's share of the records), so that every minibatch loss estimates the full-batch
loss: dividing by the minibatch's own total would give a type with little weight in a
minibatch a full step on other types' records.

A pair (m=2, L=1) gives the standard DPO sigmoid loss -log sigmoid(beta * ((pc - rc) - (pr - rr)))
(Rafailov et al., 2023); longer lists give the Plackett-Luce DPO loss of the same paper.

The forward pass runs one fused kernel that computes the loss and its gradient with respect to
the policy log-probabilities together (O(m) per record); only that gradient is kept for the
backward pass, which scales it by the incoming gradient. CPU tensors run the C++/OpenMP kernels
without a copy, CUDA tensors the CUDA kernels on the current stream.

Gradients flow to ``policy_logps`` only. ``ref_logps`` and ``weights`` are treated as constants
(detached), as in DPO where the reference model is frozen and in EM-DPO where the weights are
the E-step's posteriors: pass tensors that require grad and they still get no gradient.

float16/bfloat16 inputs are computed in float32; the loss comes back in the promoted input
dtype and the gradient in the dtype of ``policy_logps``.

Under ``torch.compile`` the kernel call is an explicit graph break (it runs eagerly between two
compiled graphs), so ``fullgraph=True`` is not supported.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _checks
from .ops import _cpu as _cpu_ops
from .ops import _torch as _torch_dispatch

__all__ = [
    "listwise_dpo_loss",
    "ListwiseDPOLoss",
    "pairwise_dpo_loss",
    "padded_listwise_dpo_loss",
    "mixture_dpo_loss",
    "check_errors",
]

# Raise the first input error that earlier CUDA loss calls flagged without synchronising
# (docs/torch.md, "CUDA: which calls synchronise").
check_errors = _torch_dispatch.check_errors

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_DEVICE_TYPES = ("cpu", "cuda")

_GRAPH_BREAK_REASON = "emdpo_core's compiled kernels are opaque to dynamo and run eagerly"


def _graph_break(fn):
    """torch.compiler.disable(fn): dynamo stops before fn and runs it eagerly."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:  # pragma: no cover - torch < 2.1 has no compiler to break from
        return fn
    try:
        return disable(fn, reason=_GRAPH_BREAK_REASON)
    except TypeError:  # torch < 2.7 takes no reason
        return disable(fn)


# ----------------------------------------------------------------------------------------
# The autograd Function


def _slot_records(offsets: torch.Tensor, M: int) -> torch.Tensor:
    """(M,) index of the record each slot belongs to: record i repeated m_i times."""
    N = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    # output_size avoids a device-to-host synchronisation on CUDA.
    return torch.repeat_interleave(torch.arange(N, device=offsets.device), lengths,
                                   output_size=M)


class _ListwiseDPOLossFunction(torch.autograd.Function):
    """loss = sum_k scale_k sum_i w_ki (-ll_ki); d loss / d policy_logps from the same kernel."""

    @staticmethod
    def forward(ctx, policy_logps, ref_logps, offsets, weights, n_ranked, beta, reduction):
        loss, grad = _torch_dispatch.listwise_dpo_loss_and_grad(
            policy_logps, ref_logps, offsets, weights, beta=beta, n_ranked=n_ranked,
            reduction=reduction, return_tensors=True)
        ctx.reduction = reduction
        if ctx.needs_input_grad[0]:
            # The slot -> record map is only needed to broadcast per-record incoming gradients.
            ctx.save_for_backward(grad, offsets if reduction == "none" else None)
        # The kernel sums in float64; report the loss in the computation dtype like torch does.
        return loss.to(policy_logps.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_policy = None
        if ctx.needs_input_grad[0]:
            grad, offsets = ctx.saved_tensors
            if ctx.reduction == "none":
                # grad holds, per slot of record i, d(w_i * -ll_i)/d logpi: the weight is
                # already in it, so each slot only takes its own record's grad_output.
                grad_output = grad_output[..., _slot_records(offsets, grad.shape[-1])]
            grad_policy = grad * grad_output
        return (grad_policy,
                None,  # ref_logps: the frozen reference, a constant of DPO
                None,  # offsets: integer layout
                None,  # weights: constants (E-step posteriors), no gradient
                None,  # n_ranked: integer layout
                None,  # beta: float hyperparameter
                None)  # reduction: string


@_graph_break
def _apply(policy, ref, offsets, weights, n_ranked, beta, reduction):
    # One place where dynamo stops: the kernels are opaque to it, so it runs this eagerly.
    return _ListwiseDPOLossFunction.apply(policy, ref, offsets, weights, n_ranked, beta,
                                          reduction)


# ----------------------------------------------------------------------------------------
# The small-batch CPU path. A trainer calls the loss once per micro-batch on a few records;
# there the Python layers (argument preparation, the dispatch module's re-checks, tensor
# wrapping) cost several times the kernel. This path handles the common case, contiguous
# float32/float64 CPU tensors of one dtype and no per-record output, with each argument
# checked once, then one kernel call on NumPy views of the tensors. Anything else takes the
# general path, and the results are the same (tested bit for bit).


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


def _small_cpu(*tensors) -> bool:
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


def _small_weights(weights, N: int, dtype):
    """Host weights for the small-batch path, or False when it should not take them."""
    if weights is None:
        return None
    if type(weights) is not torch.Tensor or weights.device.type != "cpu" \
            or tuple(weights.shape) != (N,):
        return False                    # the general path converts, or names the problem
    return _checks.check_loss_weights(weights.detach().numpy(), 1, N, _NP_DTYPE[dtype], True)


def _small_listwise(policy, ref, offsets, weights, n_ranked, beta, reduction):
    """The small-batch path of listwise_dpo_loss, or None when it does not apply."""
    if reduction == "none" or not _small_cpu(policy, ref) or ref.shape != policy.shape:
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
    w = _small_weights(weights, off.shape[0] - 1, policy.dtype)
    if w is False:
        return None
    return _SmallListwiseFunction.apply(policy, ref.detach().numpy(), off, nr, w, reduction,
                                        beta)


def _small_pairwise(chosen, rejected, ref_chosen, ref_rejected, weights, beta, reduction):
    """The small-batch path of pairwise_dpo_loss, or None when it does not apply."""
    if reduction == "none" or not _small_cpu(chosen, rejected, ref_chosen, ref_rejected):
        return None
    B = chosen.shape[0]
    if B < 1 or rejected.shape[0] != B or ref_chosen.shape[0] != B or ref_rejected.shape[0] != B:
        return None                     # the general path names the bad argument
    beta = _checks.check_beta(beta)
    _checks.check_reduction(reduction)
    w = _small_weights(weights, B, chosen.dtype)
    if w is False:
        return None
    return _SmallPairwiseFunction.apply(chosen, rejected, ref_chosen, ref_rejected, w,
                                        reduction, beta)


# ----------------------------------------------------------------------------------------
# Argument preparation (shapes, dtypes, devices). Layout checks (offsets, n_ranked) and value
# checks (finite log-probabilities) happen in the dispatch layer, with the same messages as
# the NumPy API.


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    return type(x).__name__


def _require_policy_tensor(x, name: str) -> torch.Tensor:
    _checks.refuse_sparse(x, name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor, got {_describe(x)}; for NumPy arrays use "
            f"emdpo_core.listwise_dpo_loss_and_grad")
    if x.device.type not in _DEVICE_TYPES:
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {x.device}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}")
    return x


def _as_tensor(x, name: str, device: torch.device) -> torch.Tensor:
    _checks.refuse_sparse(x, name)
    if isinstance(x, torch.Tensor):
        if x.device != device:
            raise ValueError(
                f"{name}: on {x.device}, but policy_logps is on {device}; put all inputs on "
                f"one device")
        return x
    try:
        return torch.as_tensor(x, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected a tensor or array, got {_describe(x)} "
                        f"({_checks.clip_message(e)})") from None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels run in float32 or float64: half types are upcast to float32."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _prepare_logps(policy_logps, ref_logps):
    """(policy, ref, loss dtype): policy cast to the computation dtype (differentiably), ref
    cast and detached."""
    policy = _require_policy_tensor(policy_logps, "policy_logps")
    ref = _as_tensor(ref_logps, "ref_logps", policy.device)
    if not ref.dtype.is_floating_point:
        raise TypeError(f"ref_logps: expected a floating-point tensor, got {ref.dtype}")
    out_dtype = torch.promote_types(policy.dtype, ref.dtype)
    dtype = _compute_dtype(out_dtype)
    return policy.to(dtype), ref.detach().to(dtype), out_dtype


def _as_index(x, name: str, device: torch.device) -> torch.Tensor:
    t = _as_tensor(x, name, device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (int64), got {t.dtype}")
    if t.dtype != torch.int64:
        # every integer type is read as int64 here, once (the backward's index arithmetic
        # needs int64: uint8 offsets used to pass the forward and fail in the backward)
        if not t.dtype.is_signed and t.element_size() == 8 and t.numel():
            _checks.as_int64(t.cpu().numpy(), name)        # uint64 beyond int64
        t = t.to(torch.int64)
    return t


def _prepare_weights(weights, policy: torch.Tensor, N: int) -> Optional[torch.Tensor]:
    """None, (N,) or (K, N) in the computation dtype, detached; (N,) is shared by all K
    policies of a (K, M) ``policy``."""
    if weights is None:
        return None
    w = _as_tensor(weights, "weights", policy.device)
    if w.dtype.is_complex:
        raise TypeError(f"weights: expected real numbers, got {w.dtype}")
    K = policy.shape[0] if policy.dim() == 2 else 1
    shapes = [(N,)] + ([(K, N)] if policy.dim() == 2 else [])
    if tuple(w.shape) not in shapes:
        raise ValueError(
            f"weights: expected shape {' or '.join(map(str, shapes))} (per record"
            f"{', per policy' if policy.dim() == 2 else ''}), got {tuple(w.shape)}")
    w = w.detach().to(policy.dtype)
    if policy.dim() == 2 and w.dim() == 1:
        w = w.expand(K, N)
    return w


def _prepare_total_weight(total_weight, reduction, policy: torch.Tensor) -> Optional[torch.Tensor]:
    """None, or the divisors T_k of the "weighted_mean" reduction: shape (K,) for a (K, M)
    ``policy`` (a number is shared by all K), () for an (M,) one; detached, in the computation
    dtype. Checked on the host: finite and > 0 (one tiny device-to-host copy on CUDA)."""
    if total_weight is None:
        return None
    if _checks.check_reduction(reduction) != "weighted_mean":
        raise ValueError(f"total_weight: only with reduction='weighted_mean' (it is that "
                         f"reduction's divisor, in place of the weights' own total), got "
                         f"reduction={reduction!r}")
    t = _as_tensor(total_weight, "total_weight", policy.device)
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"total_weight: expected real numbers > 0, got {t.dtype}")
    K = policy.shape[0] if policy.dim() == 2 else None
    shapes = [()] + ([(K,)] if K is not None else [(1,)])
    if tuple(t.shape) not in shapes:
        raise ValueError(f"total_weight: expected shape {' or '.join(map(str, shapes))} (a "
                         f"number{', or one per policy' if K is not None else ''}), got "
                         f"{tuple(t.shape)}")
    host = t.detach().reshape(-1).to("cpu", torch.float64)
    bad = torch.nonzero(~torch.isfinite(host) | (host <= 0))
    if bad.numel():
        i = int(bad[0, 0])
        where = "" if t.dim() == 0 else f" at index {i}"
        raise ValueError(f"total_weight: expected finite numbers > 0 (each policy's total "
                         f"weight over all records), got {host[i].item()}{where}")
    t = t.detach().to(policy.dtype)
    return t.reshape(()) if K is None else t.expand(K)


def _n_records(offsets: torch.Tensor) -> int:
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(
            f"offsets: expected a 1-D tensor of N+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    return offsets.shape[0] - 1


# ----------------------------------------------------------------------------------------
# Public API


def listwise_dpo_loss(policy_logps, ref_logps, offsets, weights=None, *, beta, n_ranked=None,
                      reduction="mean", total_weight=None):
    """Weighted listwise (Plackett-Luce) DPO loss, differentiable in ``policy_logps``.

    With r_kj = beta * (policy_logps[k, j] - ref_logps[j]) and record i in slots
    offsets[i]:offsets[i+1], best first, of which the first L_i = n_ranked[i] are ranked:

        ll_ki = sum_{t < L_i} (r_kt - logsumexp_{s >= t} r_ks)
        loss  = sum_k scale_k * sum_i w_ki * (-ll_ki)

    with scale_k = 1 ("sum"), 1/N ("mean") or 1/T_k ("weighted_mean"; T_k = ``total_weight``
    when given, else sum_i w_ki over these records). For lists of two (a chosen and a rejected
    response) this is the DPO loss -log sigmoid(beta * margin).

    Minibatches: pass ``total_weight`` = each type's total weight over all records of the
    M-step (sum over the whole data set, and over all ranks when sharded), times the
    minibatch's share of the records (B / N) to keep the full-batch scale. Then every
    minibatch loss is an unbiased estimate of the full-batch weighted mean, and the gradients
    of the minibatches of one epoch add up to the full-batch gradient (times N / B). Without
    it, "weighted_mean" divides by the minibatch's own total, which scales up a type that has
    little weight in the minibatch: its step is then driven by other types' records.

    Args:
        policy_logps: (M,) or (K, M) sequence log-probabilities of the policy (K policies, one
            per row), float16/bfloat16/float32/float64, on CPU or CUDA. Gets the gradient.
        ref_logps: (M,) reference log-probabilities. A constant: no gradient.
        offsets: (N+1,) integer record offsets, offsets[0] = 0, offsets[N] = M, every record
            at least 2 slots long. Tensor (on the policy's device), array or list.
        weights: optional (N,) per-record weights (for a (K, M) policy: (K, N) per policy, or
            (N,) shared by all). In EM-DPO, w_ki = c_i * gamma_{a_i k}. A constant: no gradient.
        beta: DPO temperature, > 0.
        n_ranked: optional (N,) number of ranked leading slots L_i in [1, m_i - 1]; default
            m_i - 1 (full rankings). Use 1 for best-of-m choices.
        reduction: "mean" (divide by N), "sum", "weighted_mean" (divide by the total weight,
            per policy) or "none" (per-record losses w_ki * (-ll_ki), (N,) or (K, N)).
        total_weight: optional divisor of "weighted_mean" (only with that reduction): a
            number > 0, or (K,) one per policy for a (K, M) ``policy_logps``. A constant.

    Returns:
        A 0-d tensor (or (N,) / (K, N) for "none") in the promoted dtype of the log-probabilities.

    Example:
        >>> import torch, emdpo_core.torch as et
        >>> logits = torch.zeros(5, requires_grad=True)
        >>> policy = torch.log_softmax(logits, 0)[torch.tensor([0, 1, 2, 3, 4])]
        >>> ref = torch.full((5,), -1.6094)
        >>> loss = et.listwise_dpo_loss(policy, ref, [0, 3, 5], beta=1.0)
        >>> loss.backward()
        >>> round(loss.item(), 4)  # (log 3! + log 2!) / 2 for uniform policies
        1.2425
    """
    # The small-batch path has no total_weight; with one, the general path below rescales.
    fast = None if total_weight is not None else \
        _small_listwise(policy_logps, ref_logps, offsets, weights, n_ranked, beta, reduction)
    if fast is not None:
        return fast
    policy, ref, out_dtype = _prepare_logps(policy_logps, ref_logps)
    device = policy.device
    offsets = _as_index(offsets, "offsets", device)
    N = _n_records(offsets)
    if n_ranked is not None:
        n_ranked = _as_index(n_ranked, "n_ranked", device)
    weights = _prepare_weights(weights, policy, N)
    total = _prepare_total_weight(total_weight, reduction, policy)
    if total is not None:
        # sum_i (w_ki / T_k) (-ll_ki): the kernel's "sum" of the rescaled weights.
        if weights is None:
            shape = (policy.shape[0], N) if policy.dim() == 2 else (N,)
            weights = torch.ones(shape, dtype=policy.dtype, device=policy.device)
        weights = weights / (total[:, None] if total.dim() == 1 else total)
        reduction = "sum"
    loss = _apply(policy, ref, offsets, weights, n_ranked, beta, reduction)
    return loss if loss.dtype == out_dtype else loss.to(out_dtype)


class ListwiseDPOLoss(torch.nn.Module):
    """Module form of :func:`listwise_dpo_loss` with ``beta`` and ``reduction`` fixed.

    Example:
        >>> import torch, emdpo_core.torch as et
        >>> criterion = et.ListwiseDPOLoss(beta=0.1)
        >>> policy = torch.tensor([-1.0, -2.0, -3.0, -1.5, -1.0], requires_grad=True)
        >>> ref = torch.full((5,), -2.0)
        >>> loss = criterion(policy, ref, torch.tensor([0, 3, 5]))
        >>> loss.backward()
    """

    def __init__(self, beta: float, reduction: str = "mean"):
        super().__init__()
        self.beta = _checks.check_beta(beta)
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, policy_logps, ref_logps, offsets, weights=None, n_ranked=None,
                total_weight=None):
        return listwise_dpo_loss(policy_logps, ref_logps, offsets, weights, beta=self.beta,
                                 n_ranked=n_ranked, reduction=self.reduction,
                                 total_weight=total_weight)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"


@functools.lru_cache(maxsize=8)
def _regular_offsets(n_records: int, m: int, device: torch.device) -> torch.Tensor:
    """Offsets of n_records lists of m slots each: 0, m, 2m, ...

    Kept and reused (a trainer sees few batch shapes): no allocation per step, and on CUDA the
    dispatch's cached layout check (a device-to-host copy) runs once per shape. Never handed
    to users, so nothing writes to it.
    """
    return torch.arange(0, n_records * m + 1, m, dtype=torch.int64, device=device)


def _check_columns(names, tensors):
    first = tensors[0]
    if first.dim() != 1 or first.shape[0] < 1:
        raise ValueError(f"{names[0]}: expected shape (B,) with B >= 1, got {tuple(first.shape)}")
    for name, t in zip(names[1:], tensors[1:]):
        if tuple(t.shape) != tuple(first.shape):
            raise ValueError(
                f"{name}: expected shape {tuple(first.shape)} like {names[0]}, got "
                f"{tuple(t.shape)}")


def pairwise_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                      beta, weights=None, reduction="mean", total_weight=None):
    """Standard (sigmoid) DPO loss in TRL's column layout, through the listwise kernel.

        loss_i = -log sigmoid(beta * ((chosen_i - ref_chosen_i) - (rejected_i - ref_rejected_i)))

    reduced over the B pairs as in :func:`listwise_dpo_loss` (each pair is a list of two).

    Args:
        chosen_logps, rejected_logps: (B,) policy log-probabilities; get gradients.
        ref_chosen_logps, ref_rejected_logps: (B,) reference log-probabilities; constants.
        beta: > 0.
        weights: optional (B,) per-pair weights; a constant.
        reduction: "mean" | "sum" | "weighted_mean" | "none" ((B,) per-pair losses).
        total_weight: optional divisor of "weighted_mean" (see :func:`listwise_dpo_loss`).

    Example:
        >>> import torch, emdpo_core.torch as et
        >>> pc = torch.tensor([-1.0, -2.0], requires_grad=True)
        >>> pr = torch.tensor([-3.0, -1.0], requires_grad=True)
        >>> ref = torch.tensor([-2.0, -2.0])
        >>> loss = et.pairwise_dpo_loss(pc, pr, ref, ref, beta=0.5)
        >>> expected = -torch.nn.functional.logsigmoid(0.5 * ((pc - ref) - (pr - ref))).mean()
        >>> torch.allclose(loss, expected)
        True
    """
    fast = None if total_weight is not None else \
        _small_pairwise(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        weights, beta, reduction)
    if fast is not None:
        return fast
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    chosen = _require_policy_tensor(chosen_logps, names[0])
    device = chosen.device
    rejected = _as_tensor(_require_policy_tensor(rejected_logps, names[1]), names[1], device)
    ref_chosen = _as_tensor(ref_chosen_logps, names[2], device)
    ref_rejected = _as_tensor(ref_rejected_logps, names[3], device)
    cols = (chosen, rejected, ref_chosen, ref_rejected)
    _check_columns(names, cols)
    for name, t in zip(names, cols):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in cols))
    B = chosen.shape[0]
    # Interleave into lists of two, chosen first: slots (2i, 2i+1) hold pair i.
    policy = torch.stack((chosen.to(dtype), rejected.to(dtype)), dim=1).reshape(2 * B)
    ref = torch.stack((ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)),
                      dim=1).reshape(2 * B)
    return listwise_dpo_loss(policy, ref, _regular_offsets(B, 2, device), weights, beta=beta,
                             reduction=reduction, total_weight=total_weight)


def _check_lengths(lengths: torch.Tensor, B: int, m_max: int) -> bool:
    """Checks 2 <= lengths[i] <= m_max; returns True when every list is full (no padding)."""
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths: expected shape ({B},) (one per row), got "
                         f"{tuple(lengths.shape)}")
    if lengths.device.type == "cpu":
        # NumPy's integer min/max are ~50x faster than torch's on CPU (measured, 1M int64).
        host = lengths.numpy()
        lo, hi = int(host.min()), int(host.max())
    else:
        lo, hi = torch.stack(torch.aminmax(lengths)).tolist()  # one pass, one tiny host copy
    if lo < 2 or hi > m_max:
        host = lengths.cpu()
        i = int(torch.nonzero((host < 2) | (host > m_max))[0, 0])
        raise ValueError(
            f"lengths: expected 2 <= lengths[i] <= m_max = {m_max}, got lengths[{i}] = "
            f"{int(host[i])}")
    return lo == m_max


def padded_listwise_dpo_loss(policy_logps, ref_logps, lengths, weights=None, *, beta,
                             n_ranked=None, reduction="mean", total_weight=None):
    """:func:`listwise_dpo_loss` for lists kept padded, one per row, best first.

    Row b holds its lengths[b] responses in columns 0..lengths[b]-1; the columns after them
    are padding and are never read (they may hold anything, even NaN) and get zero gradient.
    The valid slots are gathered into the packed layout, the kernel runs on them, and the
    gradient is scattered back by autograd. When every row is full no copy is made.

    Args:
        policy_logps: (B, m_max) policy log-probabilities; gets the gradient.
        ref_logps: (B, m_max) reference log-probabilities; a constant.
        lengths: (B,) integer list lengths, 2 <= lengths[b] <= m_max.
        weights: optional (B,) per-list weights; a constant.
        beta, n_ranked ((B,)), reduction, total_weight: as in :func:`listwise_dpo_loss`
            ("none": (B,)).

    Example:
        >>> import torch, emdpo_core.torch as et
        >>> policy = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -1.0, 0.0]], requires_grad=True)
        >>> ref = torch.full((2, 3), -2.0)
        >>> loss = et.padded_listwise_dpo_loss(policy, ref, torch.tensor([3, 2]), beta=0.1)
        >>> loss.backward()
        >>> policy.grad[1, 2].item()  # padding
        0.0
    """
    policy = _require_policy_tensor(policy_logps, "policy_logps")
    if policy.dim() != 2 or policy.shape[0] < 1 or policy.shape[1] < 2:
        raise ValueError(f"policy_logps: expected shape (B, m_max) with B >= 1 and m_max >= 2, "
                         f"got {tuple(policy.shape)}")
    device = policy.device
    ref = _as_tensor(ref_logps, "ref_logps", device)
    if tuple(ref.shape) != tuple(policy.shape):
        raise ValueError(f"ref_logps: expected shape {tuple(policy.shape)} like policy_logps, "
                         f"got {tuple(ref.shape)}")
    B, m_max = policy.shape
    lengths = _as_index(lengths, "lengths", device)
    if _check_lengths(lengths, B, m_max):
        flat_policy, flat_ref = policy.reshape(-1), ref.detach().reshape(-1)
        offsets = _regular_offsets(B, m_max, device)
    else:
        valid = torch.arange(m_max, device=device) < lengths[:, None]
        flat_policy, flat_ref = policy[valid], ref.detach()[valid]
        offsets = torch.zeros(B + 1, dtype=torch.int64, device=device)
        torch.cumsum(lengths, 0, out=offsets[1:])
    return listwise_dpo_loss(flat_policy, flat_ref, offsets, weights, beta=beta,
                             n_ranked=n_ranked, reduction=reduction, total_weight=total_weight)


def mixture_dpo_loss(policy_logps, ref_logps, offsets, responsibilities=None, *, weights=None,
                     beta, n_ranked=None, reduction="mean", total_weight=None):
    """The EM-DPO M-step objective for K policies at once, in one kernel launch.

        loss = sum_k scale_k * sum_i w_ik * (-ll_ik),   w_ik = responsibilities[i, k]

    (in EM-DPO, w_ik = c_i * gamma_{a_i k}: the posterior of record i's annotator over types,
    times the record's weight). Each row of ``policy_logps`` gets the gradient of its own term.

    Args:
        policy_logps: (K, M) log-probabilities of the K type policies over the same slots.
        ref_logps: (M,) reference log-probabilities; a constant.
        offsets: (N+1,) record offsets.
        responsibilities: (N, K) per-record weight of each type, or
        weights: (K, N) the same, transposed. Exactly one of the two; constants.
        beta, n_ranked, reduction: as in :func:`listwise_dpo_loss` ("weighted_mean" divides
            each type's term by its own total weight; "none" returns (K, N)).
        total_weight: optional (K,) per-type divisors T_k of "weighted_mean" (or one number for
            all). For minibatches: each type's total weight over all records of the M-step,
            times the minibatch's share of the records (see :func:`listwise_dpo_loss`).

    Example:
        >>> import torch, emdpo_core.torch as et
        >>> policy = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.6, 0.4],
        ...                                  [0.2, 0.3, 0.5, 0.4, 0.6]])).requires_grad_()
        >>> gamma = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> loss = et.mixture_dpo_loss(policy, torch.full((5,), -1.0), [0, 3, 5], gamma,
        ...                            beta=1.0, reduction="weighted_mean")
        >>> loss.backward()
    """
    policy = _require_policy_tensor(policy_logps, "policy_logps")
    if policy.dim() != 2:
        raise ValueError(f"policy_logps: expected shape (K, M), one row per type, got "
                         f"{tuple(policy.shape)}")
    if (responsibilities is None) == (weights is None):
        raise ValueError("responsibilities/weights: pass exactly one of responsibilities (N, K) "
                         "and weights (K, N)")
    K = policy.shape[0]
    offsets = _as_index(offsets, "offsets", policy.device)
    N = _n_records(offsets)
    if responsibilities is not None:
        resp = _as_tensor(responsibilities, "responsibilities", policy.device)
        if tuple(resp.shape) != (N, K):
            raise ValueError(f"responsibilities: expected shape ({N}, {K}) (one row per record, "
                             f"one column per type), got {tuple(resp.shape)}")
        if resp.dtype.is_complex or resp.dtype == torch.bool:
            raise TypeError(f"responsibilities: expected real numbers, got {resp.dtype}")
        # checked here, before the transpose, so that the index is (record, type)
        bad = ~(torch.isfinite(resp) & (resp >= 0))
        if bool(bad.any()):
            i, k = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"responsibilities: expected finite posteriors >= 0, got "
                             f"{resp[i, k].item()} at index ({i}, {k}) (record {i}, type {k})")
        weights = resp.t()
    else:
        weights = _as_tensor(weights, "weights", policy.device)
        if tuple(weights.shape) != (K, N):
            raise ValueError(f"weights: expected shape ({K}, {N}) (one row per type, one column "
                             f"per record), got {tuple(weights.shape)}")
    return listwise_dpo_loss(policy, ref_logps, offsets, weights, beta=beta, n_ranked=n_ranked,
                             reduction=reduction, total_weight=total_weight)
