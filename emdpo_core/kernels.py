"""Former home of the NumPy/torch entry points of the compiled ops; they live in
:mod:`emdpo_core.ops` now. Kept so that ``emdpo_core.kernels`` imports keep working."""

from .distributed import e_step   # the public E-step (process_group-aware), as emdpo_core's
from .ops.listwise import REDUCTIONS, EStepResult, listwise_dpo_loss_and_grad, listwise_loglik

__all__ = ["EStepResult", "listwise_loglik", "e_step", "listwise_dpo_loss_and_grad",
           "REDUCTIONS"]
