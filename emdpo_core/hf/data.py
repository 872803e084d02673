"""The ranked-preference format for language-model data, its checks, and converters.

A ranked row is a mapping with

- ``prompt``: a string, or a conversation (a non-empty list of ``{"role", "content"}``
  messages, rendered by the tokenizer's chat template as TRL does);
- ``responses``: two or more distinct, non-empty responses, **best first**. With a
  conversational prompt a response may also be a list of messages (the assistant turn(s));
- ``n_ranked`` (optional): L in [1, m-1], the number of leading positions whose order was
  observed (top-L); default m-1, a full ranking. A pair is m=2, L=1; best-of-3 is m=3, L=1;
- ``annotator`` (optional): any hashable id of the person who ranked. Without the column,
  every row is its own annotator.

Rows are a ``datasets.Dataset`` or a list of dicts; the converters return the same kind they
are given. Nothing in this module imports torch or transformers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

__all__ = ["validate_ranked_rows", "from_pairwise", "from_scores", "is_conversational",
           "NoAnnotatorWarning"]

REQUIRED_COLUMNS = ("prompt", "responses")


class NoAnnotatorWarning(UserWarning):
    """The rows have no ``annotator`` column: each row is taken as its own annotator."""


def _is_dataset(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _column_names(rows) -> list[str] | None:
    if _is_dataset(rows):
        return list(rows.column_names)
    return None


def _is_messages(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, Mapping) for m in value))


def is_conversational(row: Mapping) -> bool:
    """Whether a ranked row's prompt is a conversation (a list of messages)."""
    return _is_messages(row.get("prompt"))


def _check_messages(messages, where: str) -> None:
    for j, msg in enumerate(messages):
        if "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}: message {j} needs keys 'role' and 'content', "
                             f"got keys {sorted(msg)}")
        if not isinstance(msg["role"], str):
            raise ValueError(f"{where}: message {j} has a non-string role {msg['role']!r}")


def _response_key(response) -> str:
    """A canonical text of a response, to find duplicates (messages compare by content)."""
    if isinstance(response, str):
        return response
    return json.dumps([[m["role"], m["content"]] for m in response], sort_keys=True, default=str)


def _check_row(i: int, row, annotator_expected: bool | None) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {i}: expected a mapping with 'prompt' and 'responses', "
                         f"got {type(row).__name__}")
    for col in REQUIRED_COLUMNS:
        if col not in row:
            raise ValueError(f"row {i}: missing column {col!r} (ranked rows need 'prompt' and "
                             f"'responses', best first)")
    prompt = row["prompt"]
    conversational = _is_messages(prompt)
    if conversational:
        _check_messages(prompt, f"row {i}: prompt")
    elif not isinstance(prompt, str):
        raise ValueError(f"row {i}: prompt must be a string or a non-empty list of messages, "
                         f"got {type(prompt).__name__}")

    responses = row["responses"]
    if isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence):
        raise ValueError(f"row {i}: responses must be a list of responses (best first), "
                         f"got {type(responses).__name__}")
    m = len(responses)
    if m < 2:
        raise ValueError(f"row {i}: a ranking needs at least 2 responses, got {m}")
    seen: dict[str, int] = {}
    for j, resp in enumerate(responses):
        if isinstance(resp, str):
            if not resp.strip():
                raise ValueError(f"row {i}: response {j} is empty (or only whitespace)")
        elif conversational and _is_messages(resp):
            _check_messages(resp, f"row {i}: response {j}")
            if not any(str(msg["content"]).strip() for msg in resp):
                raise ValueError(f"row {i}: response {j} is empty (its messages have no content)")
        else:
            what = "a string or a list of messages" if conversational else "a string"
            raise ValueError(f"row {i}: response {j} must be {what}, got {type(resp).__name__}")
        key = _response_key(resp)
        if key in seen:
            raise ValueError(f"row {i}: responses {seen[key]} and {j} are identical "
                             f"(a ranking compares distinct responses)")
        seen[key] = j

    n_ranked = row.get("n_ranked")
    if n_ranked is not None:
        if isinstance(n_ranked, bool) or not isinstance(n_ranked, Integral):
            raise ValueError(f"row {i}: n_ranked must be an integer, got {n_ranked!r}")
        if not 1 <= int(n_ranked) <= m - 1:
            raise ValueError(f"row {i}: n_ranked must be in [1, {m - 1}] for {m} responses, "
                             f"got {int(n_ranked)}")

    if annotator_expected is not None:
        has = "annotator" in row and row["annotator"] is not None
        if annotator_expected and not has:
            raise ValueError(f"row {i}: missing annotator (other rows have one); give every "
                             f"row an annotator id or drop the column")
        if has:
            try:
                hash(row["annotator"])
            except TypeError:
                raise ValueError(f"row {i}: annotator {row['annotator']!r} is not hashable") \
                    from None


def validate_ranked_rows(rows, *, warn_missing_annotator: bool = True) -> int:
    """Check ranked rows; raise ValueError naming the first bad row and its problem.

    Checks: the ``prompt`` and ``responses`` columns exist; the prompt is a string or a list
    of messages; there are at least 2 responses, none empty or whitespace-only, no two
    identical; ``n_ranked`` (when given) is an integer in [1, m-1]; ``annotator`` (when the
    column exists) is present and hashable on every row. Without an ``annotator`` column a
    NoAnnotatorWarning says that every row is taken as its own annotator.

    Returns the number of rows.
    """
    columns = _column_names(rows)
    if columns is not None:
        for col in REQUIRED_COLUMNS:
            if col not in columns:
                raise ValueError(f"missing column {col!r}: ranked rows need 'prompt' and "
                                 f"'responses' (best first); the data set has {columns}")
    n = 0
    annotator_expected = None
    has_annotator_column = False
    for i, row in enumerate(rows):
        if i == 0 and isinstance(row, Mapping):
            has_annotator_column = "annotator" in row
            annotator_expected = has_annotator_column
        _check_row(i, row, annotator_expected)
        n += 1
    if n == 0:
        raise ValueError("no rows: ranked data needs at least one row")
    if not has_annotator_column and warn_missing_annotator:
        warnings.warn(f"no 'annotator' column: each of the {n} rows is taken as its own "
                      f"annotator (add an 'annotator' column to pool an annotator's rankings "
                      f"in the E-step)", NoAnnotatorWarning, stacklevel=2)
    return n


def _to_same_kind(template, rows: list[dict]):
    if _is_dataset(template):
        import datasets
        return datasets.Dataset.from_list(rows)
    return rows


def _split_conversation(i: int, chosen, rejected):
    """Implicit-prompt conversational pairs: the shared leading messages are the prompt."""
    n = 0
    while (n < min(len(chosen), len(rejected)) - 1 and dict(chosen[n]) == dict(rejected[n])):
        n += 1
    if n == 0:
        raise ValueError(f"row {i}: no 'prompt' column and chosen/rejected share no leading "
                         f"messages, so the prompt cannot be extracted")
    return list(chosen[:n]), list(chosen[n:]), list(rejected[n:])


def from_pairwise(dataset, annotator_column: str | None = None):
    """Ranked rows from TRL's pairwise preference rows (``prompt``, ``chosen``, ``rejected``).

    Each pair becomes a ranked row with ``responses = [chosen, rejected]`` and ``n_ranked = 1``.
    Conversational rows (messages) stay conversational; TRL's implicit-prompt format (no
    ``prompt`` column, full conversations in chosen/rejected) is split at the last shared
    message. ``annotator_column`` (optional) is renamed to ``annotator``; other columns (for
    example a per-row ``weight``) are kept. Returns a ``datasets.Dataset`` when given one,
    else a list of dicts. Bad rows raise ValueError naming the row.
    """
    columns = _column_names(dataset)
    if columns is not None:
        for col in ("chosen", "rejected"):
            if col not in columns:
                raise ValueError(f"missing column {col!r}: pairwise rows need 'chosen' and "
                                 f"'rejected'; the data set has {columns}")
        if annotator_column is not None and annotator_column not in columns:
            raise ValueError(f"annotator_column {annotator_column!r} is not a column; the data "
                             f"set has {columns}")
    out = []
    for i, row in enumerate(dataset):
        for col in ("chosen", "rejected"):
            if col not in row:
                raise ValueError(f"row {i}: missing column {col!r}")
        chosen, rejected = row["chosen"], row["rejected"]
        if "prompt" in row:
            prompt = row["prompt"]
        elif _is_messages(chosen) and _is_messages(rejected):
            prompt, chosen, rejected = _split_conversation(i, chosen, rejected)
        else:
            raise ValueError(f"row {i}: no 'prompt' column; with string completions the prompt "
                             f"must be given explicitly")
        new = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        if annotator_column is not None:
            if annotator_column not in row:
                raise ValueError(f"row {i}: missing annotator column {annotator_column!r}")
            new.pop(annotator_column, None)
            new["annotator"] = row[annotator_column]
        new.update(prompt=prompt, responses=[chosen, rejected], n_ranked=1)
        _check_row(i, new, None if annotator_column is None else True)
        out.append(new)
    if not out:
        raise ValueError("no rows: pairwise data needs at least one row")
    return _to_same_kind(dataset, out)


TIE_RULES = ("error", "first", "truncate", "drop")


def from_scores(dataset, responses_column: str = "responses", scores_column: str = "scores",
                *, ties: str = "error", annotator_column: str | None = None):
    """Ranked rows from per-response scores (UltraFeedback style); higher scores rank first.

    Each row holds a list of responses and a list of their scores (same length, finite
    numbers). The responses are sorted by decreasing score. Equal scores do not say which
    response is better, so ``ties`` picks the rule:

    - ``"error"`` (default): raise ValueError naming the row and the tied responses;
    - ``"first"``: among equal scores the response listed first ranks higher (a stable sort);
      the ranking is then full (n_ranked = m-1), so this asserts an order nobody observed;
    - ``"truncate"``: keep the ranking only down to the first tie: n_ranked = the number of
      leading positions whose response beats every response below it (a top-L ranking; the
      tied rest is unranked). Rows whose best score is tied say nothing and are dropped, with
      a warning giving their count;
    - ``"drop"``: drop every row with a tie, with a warning giving their count.

    UltraFeedback's ``completions`` (a list of {"response", "overall_score", ...}) maps to
    this with ``ds.map(lambda r: {"responses": [c["response"] for c in r["completions"]],
    "scores": [c["overall_score"] for c in r["completions"]]})``.

    ``annotator_column`` (optional) is renamed to ``annotator``; other columns are kept.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    columns = _column_names(dataset)
    if columns is not None:
        for col in ("prompt", responses_column, scores_column):
            if col not in columns:
                raise ValueError(f"missing column {col!r}; the data set has {columns}")
    out = []
    dropped = 0
    for i, row in enumerate(dataset):
        for col in ("prompt", responses_column, scores_column):
            if col not in row:
                raise ValueError(f"row {i}: missing column {col!r}")
        responses, scores = list(row[responses_column]), list(row[scores_column])
        if len(responses) != len(scores):
            raise ValueError(f"row {i}: {len(responses)} responses but {len(scores)} scores")
        for j, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(float(s)):
                raise ValueError(f"row {i}: score {j} must be a finite number, got {s!r}")
        # Stable sort by decreasing score: equal scores keep their input order.
        order = sorted(range(len(scores)), key=lambda j: -float(scores[j]))
        sorted_scores = [float(scores[j]) for j in order]
        m = len(order)
        n_ranked = m - 1
        tie = next((t for t in range(m - 1) if sorted_scores[t] == sorted_scores[t + 1]), None)
        if tie is not None:
            if ties == "error":
                a, b = order[tie], order[tie + 1]
                raise ValueError(
                    f"row {i}: responses {a} and {b} have the same score {sorted_scores[tie]}; "
                    f"pass ties='first', 'truncate' or 'drop' to choose a rule")
            if ties == "drop":
                dropped += 1
                continue
            if ties == "truncate":
                if tie == 0:
                    dropped += 1
                    continue
                n_ranked = tie
        new = {k: v for k, v in row.items() if k not in ("prompt", responses_column,
                                                          scores_column)}
        if annotator_column is not None:
            if annotator_column not in row:
                raise ValueError(f"row {i}: missing annotator column {annotator_column!r}")
            new.pop(annotator_column, None)
            new["annotator"] = row[annotator_column]
        new.update(prompt=row["prompt"], responses=[responses[j] for j in order],
                   n_ranked=n_ranked)
        _check_row(i, new, None if annotator_column is None else True)
        out.append(new)
    if dropped:
        warnings.warn(f"from_scores(ties={ties!r}): dropped {dropped} row(s) with tied scores",
                      UserWarning, stacklevel=2)
    if not out:
        raise ValueError("no rows left: every row was empty or dropped for ties")
    return _to_same_kind(dataset, out)
