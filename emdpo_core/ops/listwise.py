"""The listwise op family: per-record Plackett-Luce log-likelihoods, the fused E-step and the
weighted listwise DPO loss with its gradient.

Every public function here checks its arguments before anything crosses into C++ and raises
ValueError/TypeError naming the argument, what was expected and what was given (with the
first offending index for array contents). Checks that would need an extra pass over the big
log-probability arrays (finiteness) happen inside the fused kernels, which report the first
record with a non-finite reward; the message then names the array and slot.

NumPy arrays are checked here (:mod:`emdpo_core._checks`) and run on the CPU kernels
(:mod:`._cpu`). torch tensors go to :mod:`._torch`: CPU tensors run on the CPU kernels too
(zero copy) and come back as tensors; CUDA tensors run on the CUDA kernels on the current
stream.
"""

from __future__ import annotations

from .. import _checks
from .._checks import REDUCTIONS
from . import _cpu
from ._cpu import EStepResult

__all__ = [
    "EStepResult",
    "listwise_loglik",
    "e_step",
    "listwise_dpo_loss_and_grad",
    "REDUCTIONS",
]


# ----------------------------------------------------------------------------------------
# Public kernels


def listwise_loglik(policy_logps, ref_logps, offsets, *, beta, n_ranked=None):
    """Per-record, per-type Plackett-Luce log-likelihoods.

    ll_ik = sum_{t < L_i} (r_kt - logsumexp_{s >= t} r_ks), r_kj = beta (logpi_k - logpi_ref).

    Args:
        policy_logps: (K, M) or (M,) sequence log-probabilities, float32 or float64; slots of
            record i are offsets[i]:offsets[i+1], best first.
        ref_logps: (M,) reference log-probabilities, same dtype.
        offsets: (N+1,) integer record offsets.
        beta: DPO temperature, > 0.
        n_ranked: (N,) observed ranking depth L_i in [1, m_i - 1]; default full rankings.

    Returns:
        (N, K) array (or torch tensor for torch input) in the input dtype.
    """
    if _checks.is_torch(policy_logps):
        from . import _torch

        return _torch.listwise_loglik(policy_logps, ref_logps, offsets, beta=beta,
                                      n_ranked=n_ranked)
    beta = _checks.check_beta(beta)
    p, ref, _ = _checks.policy_and_ref(policy_logps, ref_logps)
    offsets, nr = _checks.check_layout(offsets, n_ranked, p.shape[1])
    return _cpu.listwise_loglik(p, ref, offsets, nr, beta)


def e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights, *, beta,
           n_ranked=None, record_weights=None, annotator_weights=None,
           return_record_loglik=False) -> EStepResult:
    """Fused E-step: per-record likelihoods, per-annotator sums, posteriors over types.

    Records must be grouped by annotator: records annotator_offsets[h]:annotator_offsets[h+1]
    belong to annotator h (see :func:`group_by_annotator`). With S_hk = sum_i c_i ll_ik
    (c = ``record_weights``, default 1) and v = ``annotator_weights`` (H,) (default 1: how
    many identical annotators h stands for):
        log g_hk      = log eta_k + S_hk - logsumexp_j (log eta_j + S_hj),
        loglik        = sum_h v_h logsumexp_k (log eta_k + S_hk),
        type_totals_k = sum_h v_h g_hk.
    Reductions are deterministic (bitwise the same for any thread count). Extra memory is
    O(H + N/2048) beyond the outputs; the (N, K) per-record table is only made when
    ``return_record_loglik`` is true.

    The public :func:`emdpo_core.e_step` calls this on one process (its docstring has an
    example) and combines the ranks' results on a process group.
    """
    if _checks.is_torch(policy_logps):
        from . import _torch

        return _torch.e_step(policy_logps, ref_logps, offsets, annotator_offsets, log_weights,
                             beta=beta, n_ranked=n_ranked, record_weights=record_weights,
                             annotator_weights=annotator_weights,
                             return_record_loglik=return_record_loglik)
    beta = _checks.check_beta(beta)
    p, ref, _ = _checks.policy_and_ref(policy_logps, ref_logps)
    K, M = p.shape
    offsets, nr = _checks.check_layout(offsets, n_ranked, M)
    N = offsets.shape[0] - 1
    ao = _checks.check_annotator_offsets(annotator_offsets, N)
    lw = _checks.check_log_weights(log_weights, K)
    cw = _checks.check_record_weights(record_weights, N, p.dtype)
    v = _checks.check_annotator_weights(annotator_weights, ao.shape[0] - 1)
    return _cpu.e_step(p, ref, offsets, nr, ao, lw, cw, v, beta, return_record_loglik)


def listwise_dpo_loss_and_grad(policy_logps, ref_logps, offsets, weights=None, *, beta,
                               n_ranked=None, reduction="sum"):
    """Weighted listwise DPO loss and its gradient with respect to ``policy_logps``.

    loss = sum_k scale_k * sum_i w_ki * (-ll_ki), with scale_k = 1 ("sum"), 1/N ("mean") or
    1/sum_i w_ki ("weighted_mean"). With m=2, L=1 this is the standard DPO loss
    -log sigmoid(beta * ((pc - rc) - (pr - rr))). Loss and gradient come from one fused pass
    (a suffix log-sum-exp, then prefix sums): O(m) per record.

    Args:
        policy_logps: (M,) or (K, M) float32/float64.
        ref_logps: (M,).
        offsets: (N+1,).
        weights: (N,) (or (K, N) for K policies) per-record weights; default all ones.
        beta: > 0.
        n_ranked: (N,) ranking depths; default full rankings.
        reduction: "sum" | "mean" | "weighted_mean" | "none".

    Returns:
        (loss, grad): loss a float (for "none": the per-record losses w_i (-ll_i), shape (N,)
        or (K, N)), grad the same shape and dtype as policy_logps (for "none": the gradient of
        the sum of the per-record losses).
    """
    if _checks.is_torch(policy_logps):
        from . import _torch

        return _torch.listwise_dpo_loss_and_grad(
            policy_logps, ref_logps, offsets, weights, beta=beta, n_ranked=n_ranked,
            reduction=reduction)
    beta = _checks.check_beta(beta)
    reduction = _checks.check_reduction(reduction)
    p, ref, one = _checks.policy_and_ref(policy_logps, ref_logps)
    K, M = p.shape
    offsets, nr = _checks.check_layout(offsets, n_ranked, M)
    N = offsets.shape[0] - 1
    w = _checks.check_loss_weights(weights, K, N, p.dtype, one)
    loss, grad = _cpu.listwise_dpo_loss_and_grad(p, ref, offsets, nr, w, reduction, beta)
    if one:
        grad = grad[0]
        if reduction == "none":
            loss = loss[0]
    return loss, grad


