"""RankedListCollator (tokenization, truncation, layout) and sequence_logps (padded path)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_utils import require_hf

require_hf()

import torch  # noqa: E402

from hf_utils import random_ranked_rows, tiny_model, tiny_tokenizer  # noqa: E402
from emdpo_core.hf import (RankedListCollator, sequence_logps, token_logps,  # noqa: E402
                           validate_ranked_rows)


def ids(tok, text):
    return tok(text)["input_ids"]


def naive_logps(model, tok, rows, collator):
    """Reference: each (prompt, response) alone (no padding), full float64 log-softmax."""
    out = []
    for b, row in enumerate(rows):
        t = collator.tokenize_row(row, b) if "prompt_ids" not in row else row
        for r in t["response_ids"]:
            seq = torch.tensor([t["prompt_ids"] + r])
            logits = model(input_ids=seq).logits[0].double()
            lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, seq[0, 1:, None])[:, 0]
            out.append(lp[len(t["prompt_ids"]) - 1:].sum())
    return torch.stack(out)


def test_padded_batch_shapes_and_masks(tok, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 5, m=(2, 5))
    batch = RankedListCollator(tok)(rows)
    m = [len(r["responses"]) for r in rows]
    M = sum(m)
    assert batch["layout"] == "padded"
    assert batch["offsets"].tolist() == np.concatenate([[0], np.cumsum(m)]).tolist()
    assert batch["n_ranked"].tolist() == [r["n_ranked"] for r in rows]
    assert batch["row_index"].tolist() == list(range(5))
    lengths = []
    s = 0
    for row in rows:
        p = ids(tok, row["prompt"])
        for resp in row["responses"]:
            full = ids(tok, row["prompt"] + resp)
            r = full[len(p):] + [tok.eos_token_id]      # TRL appends EOS to plain text
            n = len(p) + len(r)
            lengths.append(n)
            assert batch["input_ids"][s, :n].tolist() == p + r
            assert batch["attention_mask"][s].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            assert batch["response_mask"][s].tolist() == ([0] * len(p) + [1] * len(r)
                                                         + [0] * (batch["input_ids"].shape[1] - n))
            assert (batch["input_ids"][s, n:] == tok.pad_token_id).all()
            s += 1
    assert s == M == batch["input_ids"].shape[0]
    # Padding per batch: as long as the batch's longest slot, not a global length.
    assert batch["input_ids"].shape[1] == max(lengths)


def test_default_n_ranked_row_index_and_pad_multiple(tok):
    rows = [{"prompt": "w1", "responses": [" w2", " w3", " w4"], "row_index": 9},
            {"prompt": "w1 w5", "responses": [" w2", " w3"], "row_index": 2}]
    batch = RankedListCollator(tok, pad_to_multiple_of=8)(rows)
    assert batch["n_ranked"].tolist() == [2, 1]
    assert batch["row_index"].tolist() == [9, 2]
    assert batch["input_ids"].shape == (5, 8)


def test_conversational_prompt_uses_chat_template(tok):
    row = {"prompt": [{"role": "user", "content": "w1 w2"}],
           "responses": ["w3", [{"role": "assistant", "content": "w4 w5"}]]}
    t = RankedListCollator(tok).tokenize_row(row)
    assert tok.decode(t["prompt_ids"]) == "<user> w1 w2 <eos> <assistant>"
    assert [tok.decode(r) for r in t["response_ids"]] == ["w3 <eos>", "w4 w5 <eos>"]


def test_truncation_like_trl(tok):
    row = {"prompt": "w1 w2 w3 w4", "responses": [" w5 w6 w7 w8", " w9"]}   # +BOS: prompt 5
    t = RankedListCollator(tok, max_length=7).tokenize_row(row)
    batch = RankedListCollator(tok, max_length=7)([row])
    # keep_start: each (prompt, response) pair is cut to max_length at the end.
    assert batch["input_ids"][0].tolist() == t["prompt_ids"] + t["response_ids"][0][:2]
    assert batch["response_mask"].sum(1).tolist() == [2, 2]
    # max_prompt_length keeps the prompt's last tokens.
    batch = RankedListCollator(tok, max_length=7, max_prompt_length=2)([row])
    assert tok.decode(batch["input_ids"][1, :2]) == "w3 w4"
    assert batch["response_mask"].sum(1).tolist() == [5, 2]
    with pytest.raises(ValueError, match=r"row 0: the prompt has 5 tokens, which leaves no room"):
        RankedListCollator(tok, max_length=5)([row])
    with pytest.raises(ValueError, match="max_prompt_length .* must be smaller than max_length"):
        RankedListCollator(tok, max_length=5, max_prompt_length=5)
    with pytest.raises(ValueError, match="max_length: expected an int >= 1, got 0"):
        RankedListCollator(tok, max_length=0)


def test_columns_are_never_dropped_silently(tok):
    rows = [{"prompt": "w1", "responses": [" w2", " w3"], "weight": 0.5, "annotator": "x"},
            {"prompt": "w4", "responses": [" w5", " w6"], "weight": 2.0, "annotator": "y"}]
    batch = RankedListCollator(tok)(rows)
    assert batch["weight"].tolist() == [0.5, 2.0]
    rows[0]["source"] = "web"
    with pytest.raises(ValueError, match=r"row 0: column\(s\) \['source'\] are not read"):
        RankedListCollator(tok)(rows)
    assert "source" not in RankedListCollator(tok, ignore_columns=("source", "annotator"))(rows)
    del rows[1]["weight"]
    with pytest.raises(ValueError, match="row 1: pass-through column 'weight' is missing"):
        RankedListCollator(tok, ignore_columns=("source", "annotator"))(rows)


def test_bad_rows_in_the_collator_name_the_row(tok):
    rows = [{"prompt": "w1", "responses": [" w2", " w3"], "row_index": 4},
            {"prompt": "w1", "responses": [" w2", " w2"], "row_index": 11}]
    with pytest.raises(ValueError, match="row 11: responses 0 and 1 are identical"):
        RankedListCollator(tok)(rows)
    rows[1] = {"prompt": "", "responses": [" w2", " w3"], "row_index": 11}
    with pytest.raises(ValueError, match="row 11: the prompt has no tokens"):
        RankedListCollator(tiny_tokenizer(add_bos=False))(rows)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sequence_logps_matches_unpadded_reference(tok, kind, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 4, m=(2, 5), prompt_words=(1, 9), response_words=(1, 7))
    model = tiny_model(kind, seed=seed % 1000)
    collator = RankedListCollator(tok)
    got = sequence_logps(model, collator(rows))
    with torch.no_grad():
        want = naive_logps(model, tok, rows, collator)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # float32 model: one forward differs from another in the last bits (~1e-6 relative per
    # logit); sums over <= 8 tokens of magnitude ~5 stay within 1e-4.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_logps_invariant_to_batch_composition_and_padding(tok, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 8, m=(2, 5), response_words=(1, 12))
    model = tiny_model("llama", seed=1, dtype=torch.float64)
    collator = RankedListCollator(tok)
    full = sequence_logps(model, collator(rows))
    offs = collator(rows)["offsets"].tolist()
    # Each row alone (no padding from other rows), and a reordered batch with extra padding.
    for b, row in enumerate(rows):
        alone = sequence_logps(model, collator([row]))
        torch.testing.assert_close(alone, full[offs[b]:offs[b + 1]], rtol=1e-10, atol=1e-10)
    order = rng.permutation(8)
    padded = RankedListCollator(tok, pad_to_multiple_of=32)([rows[i] for i in order])
    again = sequence_logps(model, padded)
    expect = torch.cat([full[offs[i]:offs[i + 1]] for i in order])
    torch.testing.assert_close(again, expect, rtol=1e-10, atol=1e-10)


def test_ranked_lists_2_to_5_and_top_l(tok, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(2, 6):
        rows += random_ranked_rows(rng, 1, m=(m, m), partial=False)
        rows += random_ranked_rows(rng, 1, m=(m, m), partial=True)
    assert validate_ranked_rows(rows, warn_missing_annotator=False) == 8
    batch = RankedListCollator(tok)(rows)
    assert batch["offsets"].tolist() == [0, 2, 4, 7, 10, 14, 18, 23, 28]
    assert batch["n_ranked"].tolist()[::2] == [1, 2, 3, 4]
    assert batch["n_ranked"].tolist()[1::2] == [r["n_ranked"] for r in rows[1::2]]
    lp = sequence_logps(tiny_model("gpt2"), batch)
    assert lp.shape == (28,) and torch.isfinite(lp).all() and (lp < 0).all()


def test_pretokenized_rows_give_the_same_batch(tok, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 4, prompt_words=(2, 5), response_words=(1, 8))
    collator = RankedListCollator(tok, max_length=9)      # cuts some responses
    pre = [dict(collator.tokenize_row(r, i), n_ranked=r["n_ranked"]) for i, r in enumerate(rows)]
    a, b = collator(rows), collator(pre)
    for key in ("input_ids", "attention_mask", "response_mask", "offsets", "n_ranked"):
        assert torch.equal(a[key], b[key]), key


def test_sequence_logps_gradients_match_reference(tok, seed):
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 3)
    model = tiny_model("llama", seed=2, dtype=torch.float64)
    collator = RankedListCollator(tok)
    w = torch.from_numpy(rng.normal(size=sum(len(r["responses"]) for r in rows)))
    (sequence_logps(model, collator(rows)) * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (naive_logps(model, tok, rows, collator) * w).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_token_logps_chunks_gradcheck_and_bf16(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64) * 5
    targets = torch.randint(0, 11, (7,), generator=g)
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    for chunk in (1, 3, 7, None):
        torch.testing.assert_close(token_logps(logits, targets, chunk_rows=chunk), want,
                                   rtol=1e-12, atol=1e-12)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: token_logps(t, targets, chunk_rows=2), (x,))
    # bf16 logits: the log-softmax runs in float32 on the bf16 values (no bf16 logsumexp).
    lb = logits.to(torch.bfloat16)
    got = token_logps(lb, targets)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(lb.double(), -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)
    # Extreme logits stay finite (a -1e4 gap).
    ext = torch.tensor([[0.0, -1e4, 5.0]], dtype=torch.float32)
    assert torch.isfinite(token_logps(ext, torch.tensor([1]))).all()


def test_peft_wrapped_model_and_disabled_adapter(tok, seed):
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(seed)
    rows = random_ranked_rows(rng, 3)
    base = tiny_model("llama", seed=3)
    batch = RankedListCollator(tok)(rows)
    with torch.no_grad():
        want = sequence_logps(base, batch)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    lp = sequence_logps(model, batch)
    assert not torch.allclose(lp, want)          # the random adapter changes the policy
    lp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(sequence_logps(model, batch), want)
