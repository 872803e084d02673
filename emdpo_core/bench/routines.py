"""The package's inner routines that benchmark and check scripts outside the package time or
compare on their own, exposed here so that those scripts import no private module: the
float64 reference oracles, the EM's mixture bookkeeping and tabular MM step (Numba), and the
torch entry point of the loss that returns the loss as a tensor."""

from __future__ import annotations

from ..em._mixture import expand_record_weights, mixture_weights
from ..em._plackett_luce_mm import pl_mm_step, pl_wins
from ..ops import _reference as reference

__all__ = ["reference", "expand_record_weights", "mixture_weights", "pl_mm_step", "pl_wins",
           "torch_loss_and_grad"]


def torch_loss_and_grad(policy_logps, ref_logps, offsets, weights=None, **kwargs):
    """``listwise_dpo_loss_and_grad`` on torch tensors, with ``return_tensors=True`` accepted:
    the loss then stays a 0-d tensor on the device (no host synchronisation). Imports torch."""
    from ..ops import _torch

    return _torch.listwise_dpo_loss_and_grad(policy_logps, ref_logps, offsets, weights, **kwargs)
