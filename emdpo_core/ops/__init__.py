"""The compiled ops: NumPy and torch entry points to emdpo_core._core."""

from .listwise import EStepResult, e_step, listwise_dpo_loss_and_grad, listwise_loglik
