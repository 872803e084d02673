"""Small torch policies for the synthetic populations of :mod:`emdpo_core.datasets`.

Imported only on use (``emdpo_core.datasets.LinearSoftmaxPolicy`` or
``Population.policy_module``), so that ``import emdpo_core`` never imports torch.
"""

from __future__ import annotations

import torch

__all__ = ["LinearSoftmaxPolicy"]


class LinearSoftmaxPolicy(torch.nn.Module):
    """A linear softmax policy over a finite set of responses per prompt:

        log pi_theta(y | x) = log_softmax_y( base(x, y) + phi(x, y) . theta ),

    over the A responses of prompt x, with features phi (P, A, D) and fixed base
    log-probabilities (P, A) (the reference policy: theta = 0 gives pi_ref). The only
    parameter is theta (D,). Features and base are buffers that are not saved in the state
    dict (they are data, not parameters).

    ``forward(prompt, response)`` returns log pi(response | prompt) for a batch of slots (the
    per-slot inputs of :class:`~emdpo_core.PreferenceData`); ``sample(prompt, generator)``
    draws one response per prompt.

    Example:
        >>> import torch
        >>> from emdpo_core.datasets import LinearSoftmaxPolicy
        >>> pi = LinearSoftmaxPolicy(torch.randn(4, 5, 3), torch.full((4, 5), -1.6094))
        >>> pi(prompt=torch.tensor([0, 0]), response=torch.tensor([1, 2])).shape
        torch.Size([2])
    """

    def __init__(self, features: torch.Tensor, base_logps: torch.Tensor = None):
        super().__init__()
        if features.dim() != 3:
            raise ValueError(f"features: expected shape (P, A, D), got {tuple(features.shape)}")
        P, A, D = features.shape
        if base_logps is None:
            base_logps = torch.zeros(P, A, dtype=features.dtype)
        if tuple(base_logps.shape) != (P, A):
            raise ValueError(f"base_logps: expected shape ({P}, {A}), got "
                             f"{tuple(base_logps.shape)}")
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("base", base_logps.to(features.dtype), persistent=False)
        self.theta = torch.nn.Parameter(torch.zeros(D, dtype=features.dtype,
                                                    device=features.device))

    def log_probs(self) -> torch.Tensor:
        """(P, A) log pi_theta(y | x) of every prompt and response."""
        return torch.log_softmax(self.base + self.features @ self.theta, dim=1)

    def forward(self, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        return self.log_probs()[prompt, response]

    @torch.no_grad()
    def sample(self, prompt: torch.Tensor, generator: torch.Generator = None) -> dict:
        """One response per prompt: {"prompt": prompt, "response": (B,) int64}."""
        probs = torch.exp(self.log_probs())[prompt]
        response = torch.multinomial(probs, 1, generator=generator).reshape(-1)
        return {"prompt": prompt, "response": response}
