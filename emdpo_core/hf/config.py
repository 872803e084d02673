"""EMDPOConfig: TrainingArguments plus the EM-DPO settings of :class:`EMDPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .. import _checks

INIT_CHOICES = ("kmeans", "random")


def _arg(default, help: str):
    """A field with its ``--help`` text (``HfArgumentParser`` reads ``metadata["help"]``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class EMDPOConfig(TrainingArguments):
    """Every ``TrainingArguments`` field (learning rate, batch sizes, gradient accumulation,
    mixed precision, logging, saving, evaluation ...) plus the EM-DPO settings below.

    The length of training is set by the EM settings, not by ``num_train_epochs`` or
    ``max_steps``: there are ``em_iterations`` M-steps of ``e_step_every`` optimizer steps
    each (default: one epoch), with an E-step between two M-steps and one after the last.

    Args:
        n_types: K, the number of latent annotator types (one LoRA adapter each).
        beta: the DPO temperature (implicit reward r = beta * (log pi - log pi_ref)).
        em_iterations: the number of M-steps (EM iterations).
        e_step_every: optimizer steps per M-step; None (default) means one epoch of the
            training set.
        em_tol: stop early when the observed-data log-likelihood per record improves by less
            than this between two E-steps; None (default) runs all ``em_iterations``.
        init: how the types start, when the trainer is given no ``init_responsibilities``:
            ``"kmeans"`` (k-means over the annotators' preference directions in the base
            model's response embeddings) or ``"random"`` (Dirichlet posteriors).
        reinit_types: re-initialise every type from the base (and reset its optimizer
            state) at the start of every M-step, as the EM-DPO authors do.
        full_parameter_types: K full copies of the model instead of K LoRA adapters (small
            models only; the reference is the model you pass, frozen).
        max_length: truncate prompt + response to this many tokens (like TRL's).
        max_prompt_length: truncate prompts (from the left) to this many tokens.
        mixture_alpha: Dirichlet prior on the mixture weights, >= 1 (1 = maximum likelihood).
        logps_batch_size: ranked rows per no-grad forward (reference caching, E-steps,
            evaluation); default ``per_device_eval_batch_size``.
        prefix_sharing: collate each ranked list as one sequence with the prompt encoded
            once (see :class:`RankedListCollator`). ``None`` (default): on wherever
            ``supports_prefix_sharing(model)``, the padded layout otherwise; the trainer says
            which in ``trainer.layout_`` and its log.
        ddp_static_graph: default True here: an M-step batch runs one forward pass per type
            through the model, and DDP (``accelerate launch`` / ``torchrun``) accepts several
            forward passes before one backward pass only with a static graph. On CPU, DDP
            also needs ``use_cpu=True`` (a transformers rule). See docs/distributed.md.
    """

    n_types: int = _arg(2, "K, the number of latent types.")
    beta: float = _arg(0.1, "DPO temperature.")
    em_iterations: int = _arg(5, "Number of M-steps.")
    e_step_every: Optional[int] = _arg(None, "Optimizer steps per M-step (default: one epoch).")
    em_tol: Optional[float] = _arg(
        None, "Stop when the log-likelihood per record improves by less than this.")
    init: str = _arg("kmeans", "'kmeans' or 'random'.")
    reinit_types: bool = _arg(False, "Re-initialise every type at every M-step.")
    full_parameter_types: bool = _arg(False, "K full model copies instead of LoRA adapters.")
    max_length: Optional[int] = _arg(None, "Max tokens per slot.")
    max_prompt_length: Optional[int] = _arg(None, "Max prompt tokens.")
    mixture_alpha: float = _arg(1.0, "Dirichlet prior, >= 1.")
    logps_batch_size: Optional[int] = _arg(None, "Rows per no-grad forward.")
    prefix_sharing: Optional[bool] = _arg(
        None, "Encode each prompt once per ranked list (default: wherever the model supports it).")
    ddp_static_graph: Optional[bool] = _arg(True, "DDP static graph (K forward passes per step).")

    def __post_init__(self):
        _checks.check_int("n_types", self.n_types, 1)
        _checks.check_int("em_iterations", self.em_iterations, 1)
        for name in ("e_step_every", "max_length", "max_prompt_length", "logps_batch_size"):
            _checks.check_optional_int(name, getattr(self, name), 1)
        _checks.check_beta(self.beta)
        if self.em_tol is not None:
            _checks.check_float("em_tol", self.em_tol, 0.0)
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init: expected one of {INIT_CHOICES}, got {self.init!r}")
        _checks.check_float("mixture_alpha", self.mixture_alpha, 1.0)
        if self.prefix_sharing is not None and not isinstance(self.prefix_sharing, bool):
            raise TypeError(f"prefix_sharing: expected None, True or False, got "
                            f"{self.prefix_sharing!r}")
        if self.max_steps is not None and self.max_steps > 0:
            raise ValueError(f"max_steps: EMDPOConfig sets the length of training with "
                             f"em_iterations and e_step_every; got max_steps={self.max_steps}")
        super().__post_init__()
