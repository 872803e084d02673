"""MinMax Regret Aggregation of trained types by generation, and the served mixture.

:func:`aggregate_types` (behind :meth:`EMDPOTrainer.aggregate`) samples responses from every
type with ``generate``, scores every sample under every type and under the reference (the
base with adapters disabled), builds the regret matrix (:func:`emdpo_core.regret_matrix`)
and solves the MMRA LP (:func:`emdpo_core.mmra`). The result is a :class:`MixtureLM`: each
request is answered by one type drawn with the MMRA weights (the sequence-level mixture the LP
optimizes), and it saves to and loads from a folder (adapters + weights), written atomically
and checked on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch

from .. import _checks
from .. import mmra as _mmra
from .. import regret_matrix as _regret_matrix
from ..mmra import MixturePolicy
from . import _io, sequence_logps
from ._types import FullParameterTypes, _FullTypes, _LoraTypes

__all__ = ["MixtureLM", "aggregate_types"]

MANIFEST = "mixture.json"
FORMAT = "emdpo-hf-mixture"


def _prompt_ids(collator, prompt) -> list:
    ids = collator._encode(prompt, generation_prompt=True)
    if collator.max_prompt_length is not None:
        ids = ids[-collator.max_prompt_length:]
    if not ids:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    return ids


def _generate(module, tokenizer, prompt_ids: Sequence[list], *, n_samples: int,
              max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
              device) -> list:
    """n_samples sampled responses (token lists, ending at EOS when one was produced) for
    each prompt, in prompt order: result[p * n_samples + s]."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding: every prompt ends where generation starts.
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gen = module.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              do_sample=True, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, num_return_sequences=n_samples,
                              pad_token_id=pad, eos_token_id=eos)
        for seq in gen[:, width:].tolist():
            if eos is not None and eos in seq:
                seq = seq[:seq.index(eos) + 1]
            out.append(seq if seq else [eos])
    return out


def aggregate_types(types, tokenizer, collator, prompts, *, n_samples: int, kind: str,
                    beta: float, max_new_tokens: int = 64, temperature: float = 1.0,
                    top_p: float = 1.0, batch_size: int = 8, group_weights=None,
                    solver=None, random_state=0, device="cpu") -> "MixtureLM":
    """MMRA over the K types of a trainer's type bank; see :meth:`EMDPOTrainer.aggregate`."""
    _checks.check_int("n_samples", n_samples, 1)
    if kind not in ("reward", "kl"):
        raise ValueError(f"kind: expected 'reward' or 'kl', got {kind!r}")
    if isinstance(prompts, (str, dict)) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of prompts (strings or "
                         "conversations)")
    K = len(types.names)
    P = len(prompts)
    if K * n_samples < 2:
        raise ValueError("n_samples: one type and one sample give nothing to compare; use "
                         "n_samples >= 2")
    pids = [_prompt_ids(collator, p) for p in prompts]
    model = types.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(
                devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(int(random_state))
            samples = []                       # samples[j][p * S + s]
            for j in range(K):
                module = types.module_for(j, model)
                samples.append(_generate(module, tokenizer, pids, n_samples=n_samples,
                                         max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p,
                                         batch_size=batch_size, device=device))
            # Score: one pre-tokenized row per prompt holding all K * S samples of it.
            S = n_samples
            rows = [{"prompt_ids": pids[p],
                     "response_ids": [samples[j][p * S + s] for j in range(K)
                                      for s in range(S)]} for p in range(P)]
            # Slot p * K * S + j * S + s  ->  sample column j * P * S + p * S + s.
            p_i, j_i, s_i = np.meshgrid(np.arange(P), np.arange(K), np.arange(S), indexing="ij")
            column = (j_i * P * S + p_i * S + s_i).reshape(-1)
            logps = np.empty((K, K * P * S))
            ref = np.empty(K * P * S)
            for start in range(0, P, batch_size):
                batch = collator(rows[start:start + batch_size])
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                cols = column[start * K * S:(start + len(rows[start:start + batch_size])) * K * S]
                for k in range(K):
                    logps[k, cols] = sequence_logps(types.module_for(k, model),
                                                    batch).double().cpu().numpy()
                with types.reference(model) as ref_model:
                    ref[cols] = sequence_logps(ref_model, batch).double().cpu().numpy()
    finally:
        types.make_trainable()
        model.train(was_training)
    source_offsets = np.arange(K + 1) * P * S
    R = _regret_matrix(logps, ref if kind == "reward" else None, source_offsets, beta=beta,
                       kind=kind)
    result = _mmra(R, group_weights=group_weights, solver=solver)
    return MixtureLM(types, tokenizer, result.weights, regret_matrix=R,
                     max_regret=result.max_regret, regrets=result.regrets, kind=kind,
                     beta=beta, status=result.status, collator=collator, device=device,
                     random_state=random_state)


class MixtureLM:
    """A sequence-level mixture of K type policies of one language model.

    Each call of :meth:`generate` draws one type j with probability ``weights[j]`` and
    answers the whole request with it (for LoRA types: the adapter ``type_j`` is made
    active). Built by :meth:`EMDPOTrainer.aggregate`; saved with :meth:`save`, loaded with
    :meth:`load` onto a fresh copy of the base model.

    Attributes:
        weights: (K,) MMRA mixture weights.
        regret_matrix: (K, K) R[k, j], the estimated regret of type k served by type j.
        max_regret, regrets: the LP's worst-type regret and each type's regret (R @ w).
        kind: "reward" or "kl". last_type: the type that answered the latest request.
    """

    def __init__(self, types, tokenizer, weights, *, regret_matrix=None, max_regret=None,
                 regrets=None, kind=None, beta=None, status=None, collator=None,
                 device="cpu", random_state=None):
        from . import RankedListCollator

        self._types = types
        self.tokenizer = tokenizer
        self.collator = collator or RankedListCollator(tokenizer)
        self.device = device
        self.names = list(types.names)
        self.regret_matrix = None if regret_matrix is None else np.asarray(regret_matrix)
        self.max_regret = None if max_regret is None else float(max_regret)
        self.regrets = None if regrets is None else np.asarray(regrets)
        self.kind, self.beta, self.status = kind, beta, status
        self._mixture = MixturePolicy(weights, [self._answerer(j) for j in range(len(
            self.names))], random_state=random_state)
        self.weights = self._mixture.weights
        self.last_type = None

    def _answerer(self, j):
        def answer(prompt, **generate_kwargs):
            return self._answer_with(j, prompt, **generate_kwargs)
        return answer

    def _answer_with(self, j: int, prompt, *, max_new_tokens: int = 64, do_sample: bool = True,
                     **generate_kwargs) -> str:
        ids = _prompt_ids(self.collator, prompt)
        model = self._types.model
        was_training = model.training
        model.eval()
        try:
            module = self._types.module_for(j, model)
            tok = self.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            with torch.no_grad():
                out = module.generate(input_ids=torch.tensor([ids], device=self.device),
                                      attention_mask=torch.ones((1, len(ids)), dtype=torch.long,
                                                                device=self.device),
                                      max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      pad_token_id=pad, **generate_kwargs)
        finally:
            self._types.make_trainable()
            model.train(was_training)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    def generate(self, prompt, **generate_kwargs) -> str:
        """Answer one prompt (a string or a conversation) with one type drawn by the weights;
        keyword arguments go to ``model.generate``. Returns the decoded response."""
        answer = self._mixture(prompt, **generate_kwargs)
        self.last_type = self._mixture.last_component
        return answer

    __call__ = generate

    def __repr__(self) -> str:
        return f"MixtureLM(weights={np.round(self.weights, 4).tolist()}, types={self.names})"

    # ------------------------------------------------------------------------------------
    # Persistence

    def save(self, path: str) -> None:
        """Write the K types (LoRA adapters, or full weights) and the weights to the folder
        ``path``: built in a temporary folder beside it, then moved into place, with a
        manifest of SHA-256 checksums of every file."""
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-mixture-", dir=parent)
        try:
            kind = self._save_types(tmp)
            files = {}
            for root, _, names in os.walk(tmp):
                for name in names:
                    full = os.path.join(root, name)
                    with open(full, "rb") as f:
                        files[os.path.relpath(full, tmp)] = _io.sha256(f.read())
            manifest = {
                "format": FORMAT, "version": 1, "types": kind, "names": self.names,
                "weights": self.weights.tolist(), "kind": self.kind, "beta": self.beta,
                "max_regret": self.max_regret, "status": self.status,
                "regret_matrix": None if self.regret_matrix is None
                else self.regret_matrix.tolist(),
                "files": files,
            }
            _io.atomic_write_bytes(os.path.join(tmp, MANIFEST),
                                   json.dumps(manifest, indent=1).encode())
            _io.replace_dir(tmp, path)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_types(self, folder: str) -> str:
        if isinstance(self._types, _FullTypes):
            from safetensors.torch import save_file

            for j, name in enumerate(self.names):
                state = {n: p.detach().contiguous().cpu()
                         for n, p in self._types.model.types[j].state_dict().items()}
                save_file(state, os.path.join(folder, f"{name}.safetensors"))
            return "full"
        self._types.model.save_pretrained(folder, selected_adapters=self.names)
        return "lora"

    @classmethod
    def load(cls, path: str, model, tokenizer, *, device=None, random_state=None):
        """A saved mixture on ``model`` (a fresh instance of the base model the types were
        trained on). Refuses a folder whose manifest is missing or unreadable, or any file
        whose checksum does not match, with a ValueError naming the file."""
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"{mpath}: no such file (not a saved MixtureLM folder)")
        try:
            with open(mpath, "rb") as f:
                manifest = json.loads(f.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{mpath}: damaged manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: not a MixtureLM manifest")
        for rel, digest in manifest["files"].items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise ValueError(f"{full}: missing (listed in {MANIFEST})")
            with open(full, "rb") as f:
                if _io.sha256(f.read()) != digest:
                    raise ValueError(f"{full}: checksum mismatch, the file is damaged; "
                                     f"refusing to load it")
        names = list(manifest["names"])
        if device is None:
            device = next(model.parameters()).device
        if manifest["types"] == "full":
            from safetensors.torch import load_file

            container = FullParameterTypes(model, len(names))
            for j, name in enumerate(names):
                container.types[j].load_state_dict(
                    load_file(os.path.join(path, f"{name}.safetensors")))
            types = _FullTypes(container.to(device))
        else:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, os.path.join(path, names[0]),
                                                   adapter_name=names[0])
            for name in names[1:]:
                peft_model.load_adapter(os.path.join(path, name), adapter_name=name)
            types = _LoraTypes(peft_model.to(device), names, trainable=False)
        return cls(types, tokenizer, manifest["weights"], regret_matrix=manifest["regret_matrix"],
                   max_regret=manifest["max_regret"], kind=manifest["kind"],
                   beta=manifest["beta"], status=manifest["status"], device=device,
                   random_state=random_state)
