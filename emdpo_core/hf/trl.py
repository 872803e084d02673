"""The compiled DPO loss inside TRL's own DPOTrainer, with a per-row ``weight`` column.

For TRL users with pairwise data, change one import::

    from emdpo_core.hf.trl import DPOTrainer     # instead of: from trl import DPOTrainer

Everything else stays TRL's: its data preparation, reference handling (a PEFT adapter
disabled, a reference model, or precomputed reference log-probabilities), its logged metrics
(rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/*, entropy, ...)
and its checkpoints. Two things change:

- the loss is :func:`emdpo_core.torch.pairwise_dpo_loss` (the fused listwise kernel), equal
  to TRL's ``loss_type="sigmoid"`` loss;
- a per-row ``weight`` column (name set by ``weight_column``) is honoured: the loss is
  ``sum_i w_i * loss_i / B`` over the B pairs of a batch (``reduction="mean"``), so weights of
  1 give TRL's loss exactly. TRL itself drops such a column silently (it is not among its
  signature columns and its collator ignores it); here it travels through the data pipeline
  and every weight is checked (finite, >= 0) with the bad row named.

TRL 1.16's ``DPOTrainer`` computes the sequence log-probabilities and the loss in one method
with no hook for the loss, so this subclass lets TRL's method run unchanged (its metrics are
logged from it) and reads the per-token log-probabilities the model returned to it (a forward
hook, no second forward pass); the loss TRL computed is replaced by the compiled one.
Supported: the sigmoid loss with TRL's defaults (``loss_type=["sigmoid"]``,
``f_divergence_type="reverse_kl"``, no ``ld_alpha``, no WPO weighting); other settings raise.
"""

from __future__ import annotations

import math

import torch
import trl

from ..torch import pairwise_dpo_loss

__all__ = ["DPOTrainer"]


class _WeightCollator:
    """Adds the rows' weights, as a float tensor, to the batches of TRL's collator."""

    def __init__(self, collator, column: str):
        self.collator = collator
        self.column = column

    def __call__(self, examples):
        for j, ex in enumerate(examples):
            if self.column not in ex:
                raise ValueError(f"{self.column}: missing in batch example {j}; every row needs "
                                 f"a weight")
        batch = self.collator(examples)
        batch[self.column] = torch.tensor([float(ex[self.column]) for ex in examples],
                                          dtype=torch.float32)
        return batch


def _check_weights(dataset, column: str, name: str) -> None:
    for i, w in enumerate(dataset[column]):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or w < 0:
            raise ValueError(f"{name}: row {i} has {column}={w!r}; weights must be finite "
                             f"numbers >= 0")


def _has_column(dataset, column: str) -> bool:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):       # DatasetDict
        return any(column in v for v in names.values())
    return names is not None and column in names


class DPOTrainer(trl.DPOTrainer):
    """TRL's ``DPOTrainer`` with the compiled sigmoid DPO loss and per-row weights.

    Takes TRL's arguments plus ``weight_column`` (default ``"weight"``): when the training or
    evaluation data set has that column, each pair's loss is multiplied by its weight; when
    ``weight_column`` is given explicitly and the training set lacks it, a ValueError says so.
    """

    def __init__(self, *args, weight_column: str = "weight", **kwargs):
        explicit = "weight_column" in kwargs or weight_column != "weight"
        train = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        self.weight_column = weight_column
        self._weighted = train is not None and _has_column(train, weight_column)
        if explicit and not self._weighted:
            raise ValueError(f"weight_column={weight_column!r}: the training data set has no "
                             f"such column")
        if self._weighted:
            _check_weights(train, weight_column, "train_dataset")
            ev = kwargs.get("eval_dataset")
            if ev is not None and not isinstance(ev, dict) and _has_column(ev, weight_column):
                _check_weights(ev, weight_column, "eval_dataset")
        super().__init__(*args, **kwargs)
        self._check_supported()
        if self._weighted:
            self.data_collator = _WeightCollator(self.data_collator, weight_column)
        self._captured = []
        targets = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        self._hooks = [m.register_forward_hook(self._capture) for m in targets]

    def _check_supported(self):
        a = self.args
        problems = []
        if list(self.loss_types) != ["sigmoid"]:
            problems.append(f"loss_type={list(self.loss_types)} (only ['sigmoid'])")
        if any(w != 1.0 for w in self.loss_weights):
            problems.append(f"loss_weights={list(self.loss_weights)}")
        if self.f_divergence_type != "reverse_kl":
            problems.append(f"f_divergence_type={self.f_divergence_type!r}")
        if self.ld_alpha is not None:
            problems.append(f"ld_alpha={self.ld_alpha}")
        if self.use_weighting:
            problems.append("use_weighting=True")
        if getattr(a, "padding_free", False):
            problems.append("padding_free=True")
        if self._is_vision_dataset:
            problems.append("vision data")
        if problems:
            raise ValueError("emdpo_core.hf.trl.DPOTrainer computes TRL's sigmoid DPO loss; "
                             "unsupported settings: " + ", ".join(problems))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._weighted and self.weight_column not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [self.weight_column]

    def _capture(self, module, args, output):
        if self._capturing and getattr(output, "log_probs", None) is not None:
            self._captured.append(output)

    _capturing = False

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k != self.weight_column}
        return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        weights = inputs.get(self.weight_column) if self._weighted else None
        inputs = {k: v for k, v in inputs.items() if k != self.weight_column}
        self._captured = []
        self._capturing = True
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            self._capturing = False
        captured, self._captured = self._captured, []
        seq_len = inputs["completion_mask"].shape[1] - 1
        policy_out = captured[0]
        logps = policy_out.log_probs[:, -seq_len:].sum(dim=1)
        chosen, rejected = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = captured[1].log_probs[:, -seq_len:].sum(dim=1)
            ref_chosen, ref_rejected = ref.chunk(2, dim=0)
        loss = pairwise_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                                 weights=weights, reduction="mean")
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy_out.aux_loss
        if weights is not None:
            mode = "train" if self.model.training else "eval"
            w = self.accelerator.gather_for_metrics(weights.detach())
            self._metrics[mode]["weights/mean"].append(w.float().mean().item())
        if return_outputs:
            return loss, result[1]
        return loss
