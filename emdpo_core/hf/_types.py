"""The K types of an EMDPOTrainer: K LoRA adapters on one base model, or K full copies.

Both banks answer the same calls: ``module_for(k, model)`` (make type k the one a forward
pass uses and return the module to call), ``reference(model)`` (a context giving the
reference policy), ``make_trainable()``, ``state_dict()`` / ``load_state_dict()`` of the
types' weights and ``type_params(k)``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import List

import torch

# ----------------------------------------------------------------------------------------
# The K types: LoRA adapters on one base, or full copies


class _TypeBank:
    """The types' weights as a state dict: ``_weights()`` gives (name, parameter) of every
    weight of the K types (not of the reference)."""

    def state_dict(self) -> dict:
        return {n: p.detach().clone() for n, p in self._weights()}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self._weights())
        for n, v in state.items():
            if n not in params:
                raise ValueError(f"type weights: unknown parameter {n!r}")
            with torch.no_grad():
                params[n].copy_(v)


class _LoraTypes(_TypeBank):
    """K LoRA adapters ``type_0 .. type_{K-1}`` on one peft model; the reference is the base
    with adapters disabled (no second copy of the base)."""

    def __init__(self, model, names: List[str], trainable: bool = True):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = model
        self.names = names
        self.trainable = trainable
        self._layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.params = [[p for n, p in model.named_parameters() if f".{name}." in n]
                       for name in names]
        for k, ps in enumerate(self.params):
            if not ps:
                raise ValueError(f"peft_config: adapter {names[k]} has no parameters")
        self.make_trainable()

    def module_for(self, k: int, model):
        # What peft's set_adapter does to the forward pass (each LoRA layer's active adapter),
        # without its walk over every module of the model and without freezing the other
        # adapters (peft's set_adapter leaves only the active one trainable, and a leaf with
        # requires_grad=False gets no gradient): that walk was most of the library's own time
        # per step. Checked against set_adapter in the tests.
        name = self.names[k]
        for layer in self._layers:
            layer._active_adapter = [name]
        self.model.base_model.active_adapter = name
        return model

    def make_trainable(self):
        if not self.trainable:          # a loaded mixture: inference only
            return
        for ps in self.params:
            for p in ps:
                p.requires_grad_(True)

    @contextmanager
    def reference(self, model):
        try:
            with self.model.disable_adapter():
                yield model
        finally:
            # Re-enabling the adapters calls peft's set_adapter, which freezes all but one.
            self.make_trainable()

    def _weights(self):
        return ((n, p) for n, p in self.model.named_parameters()
                if any(f".{name}." in n for name in self.names))

    def type_params(self, k: int):
        return self.params[k]


class FullParameterTypes(torch.nn.Module):
    """K full copies of a model (``types``) and the original, frozen, as the reference. For
    small models: memory is K + 1 models plus K optimizer states."""

    def __init__(self, model, n_types: int):
        super().__init__()
        self.reference_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.types = torch.nn.ModuleList()
        for _ in range(n_types):
            m = copy.deepcopy(model)
            for p in m.parameters():
                p.requires_grad_(True)
            self.types.append(m)
        self.config = model.config
        self.active = 0

    def forward(self, *args, **kwargs):
        return self.types[self.active](*args, **kwargs)


class _FullTypes(_TypeBank):
    def __init__(self, container: FullParameterTypes):
        self.model = container
        self.names = [f"type_{k}" for k in range(len(container.types))]

    def module_for(self, k: int, model):
        self.model.active = k
        return self.model.types[k]

    def make_trainable(self):
        pass

    @contextmanager
    def reference(self, model):
        yield self.model.reference_model

    def _weights(self):
        return ((f"types.{n}", p) for n, p in self.model.types.named_parameters())

    def type_params(self, k: int):
        return list(self.model.types[k].parameters())
