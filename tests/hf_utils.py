"""Tiny Hugging Face models and a local tokenizer for the tests of emdpo_core.hf.

Nothing here downloads anything: the tokenizer is a `tokenizers` WordLevel model wrapped in
`PreTrainedTokenizerFast`, the models are built from configs with random weights. Import this
module only after `pytest.importorskip("transformers")` (see `require_hf`).

    from hf_utils import require_hf
    require_hf()                      # module-level skip when the hf extra is missing
    from hf_utils import tiny_tokenizer, tiny_model, random_ranked_rows
"""

from __future__ import annotations

import pytest

HF_REASON = "needs the hf extra (transformers, tokenizers): pip install emdpo-core[hf]"

# Words of the tiny vocabulary: w0 .. w{N_WORDS-1}. Text for the tests is made of these.
N_WORDS = 120
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<system>", "<user>", "<assistant>"]

# A minimal chat template in the style of ChatML: every message is "<role> content <eos>",
# and the generation prompt is "<assistant>".
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} <eos> "
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def require_hf():
    """Skip the calling test module (with a reason) when transformers or tokenizers is missing."""
    pytest.importorskip("torch", reason=HF_REASON)
    pytest.importorskip("transformers", reason=HF_REASON)
    pytest.importorskip("tokenizers", reason=HF_REASON)


def tiny_tokenizer(add_bos: bool = True):
    """A whitespace WordLevel tokenizer over w0..w119 plus special tokens, with a chat template.

    add_bos: prepend <bos> when tokenizing plain text (like Llama tokenizers), so that the
    add_special_tokens path is exercised.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for i in range(N_WORDS):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    if add_bos:
        backend.post_processor = TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def vocab_size() -> int:
    return len(SPECIAL) + N_WORDS


def tiny_model(kind: str = "llama", *, seed: int = 0, attn_implementation: str = "sdpa",
               hidden: int = 32, layers: int = 2, dtype=None):
    """A random 2-layer causal LM built from a config, in eval mode (no dropout).

    kind: "llama" (rotary positions, grouped-query attention) or "gpt2" (learned absolute
    positions, fused qkv); also "qwen2", "qwen3" and "mistral" (Llama-like code paths).
    """
    import torch
    import transformers

    common = dict(vocab_size=vocab_size(), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    # The Llama-like families share one config (rotary positions, grouped-query attention,
    # untied embeddings): (config class, model class, their own extra fields).
    llama_like = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        # Qwen3's default head_dim is fixed, not hidden / heads.
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": hidden // 4}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    }
    if kind in llama_like:
        config_name, cls_name, extra = llama_like[kind]
        config = getattr(transformers, config_name)(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, **extra, **common)
        cls = getattr(transformers, cls_name)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(f"kind must be 'llama', 'gpt2', 'qwen2', 'qwen3' or 'mistral', "
                         f"got {kind!r}")
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def random_text(rng, n_words: int) -> str:
    """n_words random words of the tiny vocabulary, separated by spaces."""
    return " ".join(f"w{int(i)}" for i in rng.integers(0, N_WORDS, size=n_words))


def random_ranked_rows(rng, n_rows: int, *, m=(2, 5), prompt_words=(2, 8),
                       response_words=(1, 6), partial: bool = True, annotators: int = 0,
                       conversational: bool = False):
    """Ranked rows (prompt, responses best first, n_ranked, annotator) of random words.

    Responses start with a space, so that prompt + response tokenizes as the two parts.
    m, prompt_words, response_words: inclusive (low, high) ranges. annotators > 0 adds an
    `annotator` column with ids "a0".."a{annotators-1}".
    """
    rows = []
    for i in range(n_rows):
        mi = int(rng.integers(m[0], m[1] + 1))
        prompt = random_text(rng, int(rng.integers(prompt_words[0], prompt_words[1] + 1)))
        responses = []
        while len(responses) < mi:
            r = " " + random_text(rng, int(rng.integers(response_words[0], response_words[1] + 1)))
            if r not in responses:
                responses.append(r)
        row = {"prompt": [{"role": "user", "content": prompt}] if conversational else prompt,
               "responses": responses}
        if partial:
            row["n_ranked"] = int(rng.integers(1, mi))
        if annotators:
            row["annotator"] = f"a{int(rng.integers(0, annotators))}"
        rows.append(row)
    return rows
