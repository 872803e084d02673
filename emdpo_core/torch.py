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

import torch
from torch.autograd.function import once_differentiable

from . import _checks
from . import _torch_inputs as _inputs              # argument preparation, checked once
from . import _torch_small_batch as _small_batch    # the small-batch CPU path
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
            The weights are divided by it in float64, so a tiny ``total_weight`` (below
            float32's range) is used as given.

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
        _small_batch.listwise(policy_logps, ref_logps, offsets, weights, n_ranked, beta,
                              reduction)
    if fast is not None:
        return fast
    policy, ref, out_dtype = _inputs.prepare_logps(policy_logps, ref_logps)
    device = policy.device
    offsets = _inputs.as_index(offsets, "offsets", device)
    N = _inputs.n_records(offsets)
    if n_ranked is not None:
        n_ranked = _inputs.as_index(n_ranked, "n_ranked", device)
    weights = _inputs.prepare_weights(weights, policy, N)
    total = _inputs.prepare_total_weight(total_weight, reduction, policy)
    if total is not None:
        # sum_i (w_ki / T_k) (-ll_ki): the kernel's "sum" of the rescaled weights.
        if weights is None:
            shape = (policy.shape[0], N) if policy.dim() == 2 else (N,)
            weights = torch.ones(shape, dtype=policy.dtype, device=policy.device)
        # In float64, then the computation dtype: T keeps its digits below float32's range,
        # and for a float32 T the bits are those of the float32 division (rounding a float64
        # quotient of float32 operands to float32 is correctly rounded).
        divisor = total[:, None] if total.dim() == 1 else total
        weights = (weights.to(torch.float64) / divisor).to(weights.dtype)
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
        _small_batch.pairwise(chosen_logps, rejected_logps, ref_chosen_logps,
                              ref_rejected_logps, weights, beta, reduction)
    if fast is not None:
        return fast
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    chosen = _inputs.require_policy_tensor(chosen_logps, names[0])
    device = chosen.device
    rejected = _inputs.as_tensor(_inputs.require_policy_tensor(rejected_logps, names[1]),
                                 names[1], device)
    exact = chosen.dtype == torch.float64  # Python floats: float64 for a float64 policy
    ref_chosen = _inputs.as_tensor(ref_chosen_logps, names[2], device, exact_floats=exact)
    ref_rejected = _inputs.as_tensor(ref_rejected_logps, names[3], device, exact_floats=exact)
    cols = (chosen, rejected, ref_chosen, ref_rejected)
    _inputs.check_columns(names, cols)
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
    policy = _inputs.require_policy_tensor(policy_logps, "policy_logps")
    if policy.dim() != 2 or policy.shape[0] < 1 or policy.shape[1] < 2:
        raise ValueError(f"policy_logps: expected shape (B, m_max) with B >= 1 and m_max >= 2, "
                         f"got {tuple(policy.shape)}")
    device = policy.device
    ref = _inputs.as_tensor(ref_logps, "ref_logps", device)
    if tuple(ref.shape) != tuple(policy.shape):
        raise ValueError(f"ref_logps: expected shape {tuple(policy.shape)} like policy_logps, "
                         f"got {tuple(ref.shape)}")
    B, m_max = policy.shape
    lengths = _inputs.as_index(lengths, "lengths", device)
    if _inputs.check_lengths(lengths, B, m_max):
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
    policy = _inputs.require_policy_tensor(policy_logps, "policy_logps")
    if policy.dim() != 2:
        raise ValueError(f"policy_logps: expected shape (K, M), one row per type, got "
                         f"{tuple(policy.shape)}")
    if (responsibilities is None) == (weights is None):
        raise ValueError("responsibilities/weights: pass exactly one of responsibilities (N, K) "
                         "and weights (K, N)")
    K = policy.shape[0]
    offsets = _inputs.as_index(offsets, "offsets", policy.device)
    N = _inputs.n_records(offsets)
    if responsibilities is not None:
        resp = _inputs.as_tensor(responsibilities, "responsibilities", policy.device,
                                 exact_floats=True)  # cast to the policy's dtype later
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
        weights = _inputs.as_tensor(weights, "weights", policy.device, exact_floats=True)
        if tuple(weights.shape) != (K, N):
            raise ValueError(f"weights: expected shape ({K}, {N}) (one row per type, one column "
                             f"per record), got {tuple(weights.shape)}")
    return listwise_dpo_loss(policy, ref_logps, offsets, weights, beta=beta, n_ranked=n_ranked,
                             reduction=reduction, total_weight=total_weight)
