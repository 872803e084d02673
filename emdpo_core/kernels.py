"""Former home of the NumPy/torch entry points of the compiled ops; they live in
:mod:`emdpo_core.ops` now. Kept so that ``emdpo_core.kernels`` imports keep working."""

from .ops.listwise import (REDUCTIONS, EStepResult, e_step, listwise_dpo_loss_and_grad,
                           listwise_loglik)

__all__ = ["EStepResult", "listwise_loglik", "e_step", "listwise_dpo_loss_and_grad",
           "REDUCTIONS"]
