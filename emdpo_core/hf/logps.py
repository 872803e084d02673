"""Summed response log-probabilities per slot, from a causal language model.

``sequence_logps(model, batch)`` runs the model once on a batch of
:class:`~emdpo_core.hf.RankedListCollator` and returns the (M,) sums of the response tokens'
log-probabilities, slot by slot in the rows' order (row 0's responses best first, then row 1's
...). It is differentiable and works for peft-wrapped models (the active adapter, or the base
under ``with model.disable_adapter():``).

Memory: the model is asked for logits only from the first position that predicts a response
token on (``logits_to_keep``), and the log-probability of each target token is its logit minus
a logsumexp computed in chunks of rows in float32 (float64 for float64 models). No
(tokens x vocabulary) float32 tensor is ever built; the largest temporary is one chunk. The
backward pass recomputes the softmax chunk by chunk from the saved logits (in the model's
dtype), as Liger-Kernel's chunked losses do.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

__all__ = ["sequence_logps", "supports_prefix_sharing", "resolve_layout", "token_logps",
           "prefix_sharing_mask"]

# Architectures whose attention takes a custom 4D mask through `attention_mask` and whose
# positions come from `position_ids` (rotary or learned absolute positions), checked by the
# tests against the padded path (llama, gpt2, qwen2, mistral) or sharing their attention code.
PREFIX_SHARING_MODEL_TYPES = frozenset({"llama", "gpt2", "qwen2", "qwen3", "mistral"})
# Attention implementations that read a 4D tensor mask (sdpa: boolean, eager: additive).
PREFIX_SHARING_ATTENTION = frozenset({"sdpa", "eager"})

# Elements per chunk of the chunked log-softmax: 2^22 float32 values = 16 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


class _TokenLogps(torch.autograd.Function):
    """log_softmax(logits)[t, target_t] for each row t, chunked; logits stay in their dtype."""

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):
        acc = torch.promote_types(logits.dtype, torch.float32)
        T = logits.shape[0]
        out = torch.empty(T, dtype=acc, device=logits.device)
        lse = torch.empty(T, dtype=acc, device=logits.device)
        for s in range(0, T, chunk_rows):
            x = logits[s:s + chunk_rows].to(acc)
            lse[s:s + chunk_rows] = torch.logsumexp(x, dim=-1)
            out[s:s + chunk_rows] = x.gather(1, targets[s:s + chunk_rows, None]).squeeze(1) \
                - lse[s:s + chunk_rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        chunk = ctx.chunk_rows
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_out[s:s + chunk].to(lse.dtype)
            # d/dx_v (x_t - lse) = [v = t] - softmax_v
            p = torch.exp(logits[s:s + chunk].to(lse.dtype) - lse[s:s + chunk, None])
            p.mul_(-g[:, None])
            p.scatter_add_(1, targets[s:s + chunk, None], g[:, None])
            grad[s:s + chunk] = p.to(logits.dtype)
        return grad, None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, *,
                chunk_rows: int | None = None) -> torch.Tensor:
    """``log_softmax(logits, -1).gather(-1, targets)`` for (T, V) logits without a (T, V)
    float32 temporary: float32 (float64 for float64 logits) logsumexp per chunk of rows.
    Differentiable with respect to ``logits``."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (T, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be ({logits.shape[0]},), got {tuple(targets.shape)}")
    return _TokenLogps.apply(logits, targets.long(), _chunk_rows(logits.shape[-1], chunk_rows))


# ------------------------------------------------------------------ model introspection
def _base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    if callable(get):
        try:
            return get()
        except Exception:  # noqa: BLE001 - a wrapper without a base: use the model itself
            return model
    return model


@functools.lru_cache(maxsize=None)
def _accepts(cls, name: str) -> bool:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _uses_prompt_learning(model) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def supports_prefix_sharing(model) -> bool:
    """Whether ``sequence_logps`` can run this model on the ``"prefix_shared"`` layout.

    True for the causal LMs whose attention reads a custom 4D mask and whose positions come
    from ``position_ids``: model types llama, gpt2, qwen2, qwen3, mistral, with
    ``attn_implementation`` "sdpa" or "eager", no sliding-window attention, and no peft
    prompt-learning adapter (those prepend virtual tokens). Other models (flash-attention,
    flex-attention, ALiBi or recurrent architectures) take the padded path.
    """
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None or _uses_prompt_learning(model):
        return False
    if getattr(config, "model_type", None) not in PREFIX_SHARING_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in PREFIX_SHARING_ATTENTION:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return False
    return _accepts(type(base), "position_ids")


def resolve_layout(model, batch) -> str:
    """The computation ``sequence_logps(model, batch)`` will use: "prefix_shared" or "padded"
    (a prefix-shared batch given to a model without support is unpacked to "padded")."""
    layout = batch.get("layout", "padded")
    if layout not in ("padded", "prefix_shared"):
        raise ValueError(f"batch['layout'] must be 'padded' or 'prefix_shared', got {layout!r}")
    if layout == "prefix_shared" and not supports_prefix_sharing(model):
        return "padded"
    return layout


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _attn_implementation(model) -> str | None:
    return getattr(getattr(_base_model(model), "config", None), "_attn_implementation", None)


# ------------------------------------------------------------------ layouts
def prefix_sharing_mask(segment_ids: torch.Tensor, *, dtype: torch.dtype | None = None):
    """The (B, 1, L, L) attention mask of a prefix-shared batch.

    Query q may attend to key k iff k <= q, k is not padding, and k is a prompt token or in
    q's own response. Padding queries attend to themselves only (no fully masked row, so no
    NaN from a softmax over nothing). ``dtype=None`` gives a boolean mask (True = attend, the
    form SDPA reads); a floating dtype gives the additive form (0 or the dtype's minimum) that
    eager attention adds to its scores.
    """
    B, L = segment_ids.shape
    key = segment_ids[:, None, :]
    query = segment_ids[:, :, None]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril_()
    allowed = causal & ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)
    allowed |= torch.eye(L, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _unpack_shared(batch) -> dict:
    """The padded layout of a prefix-shared batch (for models without prefix sharing)."""
    seg, ids = batch["segment_ids"], batch["input_ids"]
    seqs, masks = [], []
    for b in range(seg.shape[0]):
        s, x = seg[b], ids[b]
        prompt = x[s == 0]
        for j in range(1, int(s.max()) + 1):
            r = x[s == j]
            seqs.append(torch.cat([prompt, r]))
            masks.append(torch.cat([torch.zeros_like(prompt), torch.ones_like(r)]))
    L = max(len(q) for q in seqs)
    M = len(seqs)
    input_ids = ids.new_zeros((M, L))
    attention_mask = ids.new_zeros((M, L))
    response_mask = ids.new_zeros((M, L))
    for i, (q, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(q)] = q
        attention_mask[i, :len(q)] = 1
        response_mask[i, :len(q)] = m
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask, "layout": "padded"}


def _targets_padded(batch):
    """(row, source position, target position, slot) of every response token."""
    rows, pos = batch["response_mask"].nonzero(as_tuple=True)
    return rows, pos - 1, pos, rows


def _targets_shared(batch):
    seg = batch["segment_ids"]
    rows, pos = (seg > 0).nonzero(as_tuple=True)
    prompt_len = (seg == 0).sum(dim=1)
    s = seg[rows, pos]
    # The first token of each response is predicted from the last prompt token; later tokens
    # from the token before them, which is in the same response.
    first = seg[rows, pos - 1] != s
    src = torch.where(first, prompt_len[rows] - 1, pos - 1)
    slot = batch["offsets"].to(seg.device)[rows] + s - 1
    return rows, src, pos, slot


_WARNED_FALLBACK: set = set()


def sequence_logps(model, batch, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed log-probabilities of the response tokens, one per slot: a (M,) tensor.

    Args:
        model: a transformers causal LM (``...ForCausalLM``), possibly peft-wrapped.
        batch: the output of :class:`~emdpo_core.hf.RankedListCollator`, on the model's
            device. A ``"prefix_shared"`` batch is run with a 4D attention mask and restarted
            position ids when ``supports_prefix_sharing(model)``; otherwise it is unpacked to
            the padded layout (with a warning, once per model class).
        chunk_rows: rows of logits per chunk of the log-softmax (default: 2^22 elements per
            chunk).

    Returns float32 sums (float64 for a float64 model), differentiable with respect to the
    model's trainable parameters; the order is the slots' order (``batch["offsets"]``).
    Gradients flow when called under ``torch.enable_grad()``; wrap in ``torch.no_grad()`` for
    caching.
    """
    layout = resolve_layout(model, batch)
    if batch.get("layout", "padded") == "prefix_shared" and layout == "padded":
        key = type(_base_model(model)).__name__
        if key not in _WARNED_FALLBACK:
            _WARNED_FALLBACK.add(key)
            warnings.warn(f"{key} does not support prefix sharing (see supports_prefix_sharing); "
                          f"computing the prefix-shared batch on the padded path", UserWarning,
                          stacklevel=2)
        batch = _unpack_shared(batch)

    input_ids = batch["input_ids"]
    if layout == "padded":
        rows, src, tgt, slot = _targets_padded(batch)
        kwargs = {"attention_mask": batch["attention_mask"]}
    else:
        rows, src, tgt, slot = _targets_shared(batch)
        impl = _attn_implementation(model)
        mask_dtype = None if impl == "sdpa" else _model_dtype(model)
        kwargs = {"attention_mask": prefix_sharing_mask(batch["segment_ids"], dtype=mask_dtype),
                  "position_ids": batch["position_ids"]}
    M = int(batch["offsets"][-1])
    L = input_ids.shape[1]
    if rows.numel() == 0:
        raise ValueError("the batch has no response tokens")
    first_src = int(src.min())
    base = _base_model(model)
    if _accepts(type(base), "logits_to_keep"):
        keep = L - first_src
        kwargs["logits_to_keep"] = keep
    else:
        keep = L
    out = model(input_ids=input_ids, use_cache=False, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    offset = L - logits.shape[1]          # logits[:, i] belongs to position offset + i
    if offset > first_src:
        raise RuntimeError(f"the model returned logits for {logits.shape[1]} positions, "
                           f"fewer than the {L - first_src} needed")
    selected = logits[rows, src - offset]                       # (T, V), the model's dtype
    tok = token_logps(selected, input_ids[rows, tgt], chunk_rows=chunk_rows)
    return tok.new_zeros(M).index_add_(0, slot, tok)
