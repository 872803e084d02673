"""Ranked rows -> token batches: tokenization (plain text or chat template), truncation, and
the two batch layouts read by :func:`emdpo_core.hf.sequence_logps`.

Slots: the m responses of row b are slots ``offsets[b] .. offsets[b+1]-1``, best first, the
layout the compiled kernels read (a pair is a list of two).

Layouts
-------
``"padded"`` (``prefix_sharing=False``): one sequence per slot, prompt then response, padded
on the right to the longest slot of the batch (not of the data set). Keys: ``input_ids``,
``attention_mask`` and ``response_mask`` (1 on response tokens, the tokens whose
log-probabilities are summed), all (M, L).

``"prefix_shared"`` (``prefix_sharing=True``): one sequence per row, the prompt once followed
by the m responses, padded on the right to the longest row. Keys: ``input_ids``,
``position_ids`` (positions restart after the prompt for each response, so every response
sits at the positions it has in the padded layout), ``segment_ids`` (-1 padding, 0 prompt,
j+1 response j) and ``response_mask``, all (B, L). There is no 2D ``attention_mask``: the 4D
mask (each response sees the prompt and itself, not the other responses) is built from
``segment_ids`` by ``sequence_logps`` in the model's dtype. The prompt is encoded once per
list instead of m times.

Both layouts also carry ``offsets`` (B+1,), ``n_ranked`` (B,), ``row_index`` (B,) and
``layout`` (the string above), plus the pass-through columns (``weight`` by default).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from .. import _checks
from .data import _check_row, _is_messages

__all__ = ["RankedListCollator"]

# Columns the collator reads itself; `annotator` is ignored on purpose (the trainer maps
# slots back to annotators through `row_index`, and ids need not be numbers).
_CONSUMED = frozenset({"prompt", "responses", "n_ranked", "row_index", "prompt_ids",
                       "response_ids"})


def _common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RankedListCollator:
    """Collate ranked rows into a batch for :func:`emdpo_core.hf.sequence_logps`.

    Args:
        tokenizer: a transformers tokenizer (``processing_class``). Its ``pad_token_id`` (or
            else ``eos_token_id``) pads.
        max_length: longest (prompt, response) pair in tokens, as TRL's ``max_length`` with
            ``truncation_mode="keep_start"``: responses are cut at the end. A prompt that
            leaves no room for a response raises ValueError naming the row (set
            ``max_prompt_length`` below ``max_length`` to cut long prompts instead). In the
            prefix-shared layout the bound applies to each (prompt, response) pair, so a
            packed row is at most ``prompt + m * (max_length - prompt)`` tokens.
        max_prompt_length: longest prompt in tokens; longer prompts keep their last tokens
            (the part next to the response).
        prefix_sharing: build the ``"prefix_shared"`` layout (see the module docstring); use
            ``supports_prefix_sharing(model)`` to decide. ``sequence_logps`` falls back to the
            padded computation for models that cannot take it, with a warning.
        add_eos: append the EOS token to plain-text responses that do not end with it, as TRL
            does (conversational responses get the chat template's end-of-turn instead).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        passthrough: per-row numeric columns copied into the batch as tensors (B,), e.g. a
            ``weight`` column.
        ignore_columns: columns dropped without a word (``annotator`` by default). Any other
            column raises ValueError, so that no column is dropped silently.
        chat_template_kwargs: extra keyword arguments for ``tokenizer.apply_chat_template``.

    Rows may be raw (``prompt``, ``responses``) or already tokenized by
    :meth:`tokenize_row` (``prompt_ids``, ``response_ids``); truncation is applied here in both
    cases. A ``row_index`` field, when present, is copied to ``batch["row_index"]`` (else
    ``arange(B)``) and is the index named in errors.
    """

    def __init__(self, tokenizer, max_length: int | None = None,
                 max_prompt_length: int | None = None, prefix_sharing: bool = False, *,
                 add_eos: bool = True, pad_to_multiple_of: int | None = None,
                 passthrough=("weight",), ignore_columns=("annotator",),
                 chat_template_kwargs: Mapping | None = None):
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length),
                            ("pad_to_multiple_of", pad_to_multiple_of)):
            _checks.check_optional_int(name, value, 1)
        if max_length is not None and max_prompt_length is not None \
                and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than "
                             f"max_length ({max_length}) to leave room for the responses")
        if not isinstance(prefix_sharing, bool):
            raise TypeError(f"prefix_sharing must be a bool, got {prefix_sharing!r}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set "
                             "tokenizer.pad_token")
        overlap = (set(passthrough) & set(ignore_columns)) | (set(passthrough) & _CONSUMED)
        if overlap:
            raise ValueError(f"columns {sorted(overlap)} cannot be both passed through and "
                             f"ignored or consumed")
        # Checked above, stored below (a run of assignments alike in shape to RankingData's
        # constructor; the two share no logic).
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prefix_sharing = prefix_sharing
        self.add_eos = add_eos
        self.pad_to_multiple_of = pad_to_multiple_of
        self.passthrough = tuple(passthrough)
        self.ignore_columns = frozenset(ignore_columns)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.pad_token_id = int(pad)
        self._warned_prefix = False

    @classmethod
    def for_model(cls, tokenizer, model, **kwargs) -> "RankedListCollator":
        """A collator whose layout suits ``model``: ``prefix_sharing`` defaults to
        ``supports_prefix_sharing(model)`` (the prompt encoded once per list where the model
        can take it, the padded layout otherwise); other arguments as for the constructor."""
        from .logps import supports_prefix_sharing

        kwargs.setdefault("prefix_sharing", supports_prefix_sharing(model))
        return cls(tokenizer, **kwargs)

    @property
    def layout(self) -> str:
        return "prefix_shared" if self.prefix_sharing else "padded"

    # ------------------------------------------------------------------ tokenization
    def _encode(self, text_or_messages, *, generation_prompt: bool):
        tok = self.tokenizer
        if isinstance(text_or_messages, str):
            return list(tok(text_or_messages)["input_ids"])
        enc = tok.apply_chat_template(list(text_or_messages), tokenize=True, return_dict=True,
                                      add_generation_prompt=generation_prompt,
                                      **self.chat_template_kwargs)
        ids = enc["input_ids"]
        if len(ids) and not isinstance(ids[0], int):   # some processors return a batch of one
            ids = ids[0]
        return [int(t) for t in ids]

    def tokenize_row(self, row: Mapping, index: int = 0) -> dict:
        """``{"prompt_ids": [...], "response_ids": [[...], ...]}`` for one ranked row.

        As TRL: the prompt alone and prompt + response are tokenized, and the response starts
        where the two token lists diverge (tokens may merge across the boundary, and chat
        templates render the prompt with the assistant header); conversational prompts go
        through the chat template (``add_generation_prompt=True`` for the prompt alone).
        No truncation here (the collator truncates).
        """
        _check_row(index, row, None)
        prompt = row["prompt"]
        conversational = _is_messages(prompt)
        prompt_ids = self._encode(prompt, generation_prompt=True)
        fulls = []
        for resp in row["responses"]:
            if conversational:
                turn = [{"role": "assistant", "content": resp}] if isinstance(resp, str) \
                    else list(resp)
                fulls.append(self._encode(list(prompt) + turn, generation_prompt=False))
            else:
                fulls.append(self._encode(prompt + resp, generation_prompt=False))
        p = min(_common_prefix_length(prompt_ids, f) for f in fulls)
        if p < len(prompt_ids) and not self._warned_prefix:
            self._warned_prefix = True
            warnings.warn(
                f"row {index}: the tokenized prompt is not a prefix of prompt + response (the "
                f"template renders the prompt alone differently, or tokens merge across the "
                f"boundary); the responses start where they diverge, and "
                f"{len(prompt_ids) - p} prompt token(s) are left out. Shown once.",
                UserWarning, stacklevel=2)
        eos = self.tokenizer.eos_token_id
        responses = []
        for j, full in enumerate(fulls):
            ids = full[p:]
            if self.add_eos and not conversational and eos is not None \
                    and (not ids or ids[-1] != eos):
                ids = ids + [int(eos)]
            if not ids:
                raise ValueError(f"row {index}: response {j} has no tokens after the prompt")
            responses.append(ids)
        return {"prompt_ids": prompt_ids[:p], "response_ids": responses}

    # ------------------------------------------------------------------ collation
    def _row_tokens(self, row: Mapping, index: int):
        if "prompt_ids" in row and "response_ids" in row:
            prompt_ids = [int(t) for t in row["prompt_ids"]]
            response_ids = [[int(t) for t in r] for r in row["response_ids"]]
            if len(response_ids) < 2:
                raise ValueError(f"row {index}: a ranking needs at least 2 responses, got "
                                 f"{len(response_ids)}")
            for j, r in enumerate(response_ids):
                if not r:
                    raise ValueError(f"row {index}: response {j} has no tokens")
        else:
            tokens = self.tokenize_row(row, index)
            prompt_ids, response_ids = tokens["prompt_ids"], tokens["response_ids"]
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            prompt_ids = prompt_ids[-self.max_prompt_length:]
        if not prompt_ids:
            raise ValueError(f"row {index}: the prompt has no tokens; the first response token "
                             f"is predicted from the last prompt token (use a non-empty prompt "
                             f"or a tokenizer that adds a BOS token)")
        if self.max_length is not None:
            room = self.max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(f"row {index}: the prompt has {len(prompt_ids)} tokens, which "
                                 f"leaves no room for a response within max_length="
                                 f"{self.max_length}; set max_prompt_length below max_length")
            response_ids = [r[:room] for r in response_ids]
        m = len(response_ids)
        n_ranked = row.get("n_ranked")
        n_ranked = m - 1 if n_ranked is None else int(n_ranked)
        if not 1 <= n_ranked <= m - 1:
            raise ValueError(f"row {index}: n_ranked must be in [1, {m - 1}] for {m} "
                             f"responses, got {n_ranked}")
        return prompt_ids, response_ids, n_ranked

    def _pad_length(self, n: int) -> int:
        k = self.pad_to_multiple_of
        return n if k is None else -(-n // k) * k

    def __call__(self, rows) -> dict:
        import torch

        rows = list(rows)
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        # A pass-through column is in the batch when the first row has it, and then every
        # row must have it (and no row may have one the first row lacks).
        first = rows[0] if isinstance(rows[0], Mapping) else {}
        extra = {name: [] for name in self.passthrough if first.get(name) is not None}
        tokens, n_ranked, row_index = [], [], []
        for b, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"batch position {b}: expected a mapping, got "
                                 f"{type(row).__name__}")
            index = int(row["row_index"]) if row.get("row_index") is not None else b
            unknown = [c for c in row if c not in _CONSUMED and c not in self.ignore_columns
                       and c not in self.passthrough]
            if unknown:
                raise ValueError(
                    f"row {index}: column(s) {unknown} are not read by RankedListCollator; "
                    f"pass numeric per-row columns through with passthrough=(...), drop them "
                    f"with ignore_columns=(...), or remove them from the data set")
            for name in self.passthrough:
                has = row.get(name) is not None
                if has != (name in extra):
                    raise ValueError(f"row {index}: pass-through column {name!r} is "
                                     f"{'present' if has else 'missing'} but is "
                                     f"{'missing' if has else 'present'} in the batch's first row")
                if has:
                    extra[name].append(row[name])
            p, r, L = self._row_tokens(row, index)
            tokens.append((p, r))
            n_ranked.append(L)
            row_index.append(index)
        offsets = [0]
        for _, r in tokens:
            offsets.append(offsets[-1] + len(r))
        batch = (self._shared(tokens) if self.prefix_sharing else self._padded(tokens))
        batch["offsets"] = torch.tensor(offsets, dtype=torch.long)
        batch["n_ranked"] = torch.tensor(n_ranked, dtype=torch.long)
        batch["row_index"] = torch.tensor(row_index, dtype=torch.long)
        batch["layout"] = self.layout
        for name, values in extra.items():
            batch[name] = torch.as_tensor(values)
        return batch

    def _padded(self, tokens) -> dict:
        import torch

        seqs, masks = [], []
        for prompt, responses in tokens:
            for r in responses:
                seqs.append(prompt + r)
                masks.append([0] * len(prompt) + [1] * len(r))
        L = self._pad_length(max(len(s) for s in seqs))
        M = len(seqs)
        input_ids = torch.full((M, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((M, L), dtype=torch.long)
        response_mask = torch.zeros((M, L), dtype=torch.long)
        for s, (seq, mask) in enumerate(zip(seqs, masks)):
            n = len(seq)
            input_ids[s, :n] = torch.tensor(seq, dtype=torch.long)
            attention_mask[s, :n] = 1
            response_mask[s, :n] = torch.tensor(mask, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "response_mask": response_mask}

    def _shared(self, tokens) -> dict:
        import torch

        seqs, positions, segments = [], [], []
        for prompt, responses in tokens:
            P = len(prompt)
            seq, pos, seg = list(prompt), list(range(P)), [0] * P
            for j, r in enumerate(responses):
                seq += r
                pos += range(P, P + len(r))
                seg += [j + 1] * len(r)
            seqs.append(seq)
            positions.append(pos)
            segments.append(seg)
        L = self._pad_length(max(len(s) for s in seqs))
        B = len(seqs)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((B, L), dtype=torch.long)
        segment_ids = torch.full((B, L), -1, dtype=torch.long)
        for b in range(B):
            n = len(seqs[b])
            input_ids[b, :n] = torch.tensor(seqs[b], dtype=torch.long)
            position_ids[b, :n] = torch.tensor(positions[b], dtype=torch.long)
            segment_ids[b, :n] = torch.tensor(segments[b], dtype=torch.long)
        return {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids,
                "response_mask": (segment_ids > 0).long()}
