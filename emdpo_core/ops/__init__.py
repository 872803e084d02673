"""The compiled ops, one module per op family: :mod:`.listwise` (Plackett-Luce
log-likelihoods, the fused E-step, the weighted listwise DPO loss and its gradient) and
:mod:`.regret` (the regret matrix of MMRA). Each has a NumPy entry point; torch tensors go to
:mod:`._torch` (imported on first use). Both call the compiled module ``emdpo_core._core``.
:mod:`._reference` holds the float64 NumPy oracles the tests compare against."""

from .listwise import REDUCTIONS, EStepResult, e_step, listwise_dpo_loss_and_grad, listwise_loglik
from .regret import REGRET_KINDS, regret_matrix

__all__ = ["EStepResult", "listwise_loglik", "e_step", "listwise_dpo_loss_and_grad",
           "regret_matrix", "REDUCTIONS", "REGRET_KINDS"]
