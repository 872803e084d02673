"""Prefix-shared layout: one packed sequence per ranked list, equal to the padded path."""

from __future__ import annotations

import numpy as np
import pytest

from hf_utils import require_hf

require_hf()

import torch  # noqa: E402

from hf_utils import random_ranked_rows, tiny_model  # noqa: E402
from emdpo_core.hf import (RankedListCollator, prefix_sharing_mask, resolve_layout,  # noqa: E402
                           sequence_logps, supports_prefix_sharing)

# float32 tolerances against the padded path. The two paths run the same arithmetic on
# different tensor shapes (one packed sequence vs m padded ones), so matmul/softmax
# reductions round differently: ~1e-7 relative per activation. Summed log-probs (magnitude
# ~5-60 over up to ~15 tokens) agree to ~1e-5 absolute; 1e-4 leaves a margin.
# Parameter gradients: entries up to ~10, agree to ~1e-6 relative; we allow 1e-4 / 1e-5.
LOGP_TOL = dict(rtol=1e-5, atol=1e-4)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def test_shared_layout_positions_segments(tok):
    row = {"prompt": "w1 w2", "responses": [" w3 w4", " w5"], "n_ranked": 1}
    b = RankedListCollator(tok, prefix_sharing=True)([row])
    # <bos> w1 w2 | w3 w4 <eos> | w5 <eos>
    assert b["layout"] == "prefix_shared"
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert b["offsets"].tolist() == [0, 2] and b["n_ranked"].tolist() == [1]
    assert "attention_mask" not in b


def test_mask_lets_responses_see_prompt_and_themselves_only():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    allowed = prefix_sharing_mask(seg)[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],    # response 2 does not see response 1
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],    # padding sees itself only (no empty softmax row)
    ]
    additive = prefix_sharing_mask(seg, dtype=torch.float32)[0, 0]
    assert (additive[torch.tensor(allowed).bool()] == 0).all()
    assert (additive[~torch.tensor(allowed).bool()] == torch.finfo(torch.float32).min).all()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("kind, attn", [("llama", "sdpa"), ("llama", "eager"),
                                        ("gpt2", "sdpa"), ("gpt2", "eager")])
def test_shared_equals_padded_values_and_gradients(tok, kind, attn, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 5, m=(2, 5), prompt_words=(3, 12), response_words=(1, 6))
    model = tiny_model(kind, seed=seed % 997, attn_implementation=attn)
    assert supports_prefix_sharing(model)
    padded = RankedListCollator(tok)(rows)
    shared = RankedListCollator(tok, prefix_sharing=True)(rows)
    assert resolve_layout(model, shared) == "prefix_shared"
    # Packing saves tokens: every prompt appears once per list instead of m times.
    assert shared["response_mask"].sum() == padded["response_mask"].sum()
    assert (shared["segment_ids"] >= 0).sum() < padded["attention_mask"].sum()

    w = torch.from_numpy(rng.normal(size=int(padded["offsets"][-1]))).float()
    lp_pad = sequence_logps(model, padded)
    (lp_pad * w).sum().backward()
    g_pad = _grads(model)
    model.zero_grad()
    lp_shared = sequence_logps(model, shared)
    (lp_shared * w).sum().backward()
    g_shared = _grads(model)
    torch.testing.assert_close(lp_shared, lp_pad, **LOGP_TOL)
    assert g_pad.keys() == g_shared.keys() and len(g_pad) > 0
    for name in g_pad:
        torch.testing.assert_close(g_shared[name], g_pad[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_shared_equals_padded_other_llama_like(tok, kind, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 3, m=(3, 4))
    model = tiny_model(kind, seed=5)
    assert supports_prefix_sharing(model)
    with torch.no_grad():
        a = sequence_logps(model, RankedListCollator(tok)(rows))
        b = sequence_logps(model, RankedListCollator(tok, prefix_sharing=True)(rows))
    torch.testing.assert_close(b, a, **LOGP_TOL)


def test_shared_with_truncation_and_conversational_rows(tok, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 4, m=(2, 4), conversational=True, response_words=(2, 9))
    model = tiny_model("llama", seed=6)
    kw = dict(max_length=14, max_prompt_length=9)
    with torch.no_grad():
        a = sequence_logps(model, RankedListCollator(tok, **kw)(rows))
        b = sequence_logps(model, RankedListCollator(tok, prefix_sharing=True, **kw)(rows))
    torch.testing.assert_close(b, a, **LOGP_TOL)


def test_peft_lora_model_shares_prefix(tok, seed):
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 3)
    model = peft.get_peft_model(tiny_model("gpt2", seed=7),
                                peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                init_lora_weights=False))
    assert supports_prefix_sharing(model)
    with torch.no_grad():
        a = sequence_logps(model, RankedListCollator(tok)(rows))
        b = sequence_logps(model, RankedListCollator(tok, prefix_sharing=True)(rows))
        torch.testing.assert_close(b, a, **LOGP_TOL)
        with model.disable_adapter():
            c = sequence_logps(model, RankedListCollator(tok, prefix_sharing=True)(rows))
        assert not torch.allclose(c, a)


def test_unsupported_model_falls_back_to_padded(tok, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 3)
    model = tiny_model("llama", seed=8)
    with torch.no_grad():
        want = sequence_logps(model, RankedListCollator(tok)(rows))
    shared = RankedListCollator(tok, prefix_sharing=True)(rows)
    assert RankedListCollator.for_model(tok, model).layout == "prefix_shared"
    # A model type outside the checked list takes the padded path, and says so once.
    model.config.model_type = "not_checked"
    assert not supports_prefix_sharing(model)
    assert RankedListCollator.for_model(tok, model).layout == "padded"
    assert resolve_layout(model, shared) == "padded"
    with torch.no_grad(), pytest.warns(UserWarning, match="does not support prefix sharing"):
        got = sequence_logps(model, shared)
    torch.testing.assert_close(got, want, **LOGP_TOL)
    # Sliding-window attention and attention kernels that take no 4D tensor mask: padded.
    windowed = tiny_model("mistral", seed=8)
    windowed.config.sliding_window = 4096
    assert not supports_prefix_sharing(windowed)
    flash = tiny_model("llama", seed=8)
    flash.config._attn_implementation_internal = "flash_attention_2"
    assert flash.config._attn_implementation == "flash_attention_2"
    assert not supports_prefix_sharing(flash)
    with pytest.raises(ValueError, match="batch\\['layout'\\] must be"):
        resolve_layout(model, dict(shared, layout="packed"))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_model_float32_sums_and_both_layouts_agree(tok, attn, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 3, m=(3, 4))
    model = tiny_model("llama", seed=9, attn_implementation=attn, dtype=torch.bfloat16)
    ref = tiny_model("llama", seed=9, attn_implementation=attn)        # float32 weights
    with torch.no_grad():
        a = sequence_logps(model, RankedListCollator(tok)(rows))
        b = sequence_logps(model, RankedListCollator(tok, prefix_sharing=True)(rows))
        c = sequence_logps(ref, RankedListCollator(tok)(rows))
    assert a.dtype == b.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: activations round to ~0.4% and each token's log-prob
    # (magnitude ~5) moves by up to ~0.05; sums over <= 8 tokens stay within ~0.5 of the
    # float32 model. The two bf16 layouts round differently too, so the same bound applies.
    torch.testing.assert_close(b, a, rtol=0, atol=0.5)
    torch.testing.assert_close(a, c, rtol=0, atol=0.5)


@pytest.mark.parametrize("kind, attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_autocast_mixed_precision(tok, kind, attn, seed):
    # Trainer(bf16=True) runs float32 weights under autocast: the masks must fit both the
    # boolean (SDPA) and the additive (eager, float32 mask + bf16 scores) forms.
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 3)
    model = tiny_model(kind, seed=10, attn_implementation=attn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = sequence_logps(model, RankedListCollator(tok)(rows))
        b = sequence_logps(model, RankedListCollator(tok, prefix_sharing=True)(rows))
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=0, atol=0.5)   # bf16 bound, as in the test above
    b.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
