"""Readers: rankings from Python lists, PrefLib files (.soc, .soi, .toc, .toi) and JSON Lines,
turned into :class:`~emdpo_core.RankingData` constructor fields. Errors name the record (list
index, or file and line)."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np

from .._checks import check_id_bound, clip, clip_message

_I64_MAX = int(np.iinfo(np.int64).max)
# A line longer than this is refused: a junk file without newlines must not be read whole into
# memory and echoed. 16 MiB holds a ranking of more than a million items.
MAX_LINE_BYTES = 16 << 20


def _text_lines(path):
    """(line number, text) for every line of a UTF-8 file (a BOM on the first line is
    dropped); a line that is not UTF-8 or longer than MAX_LINE_BYTES is a ValueError naming
    the file and line."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes "
                                 f"(is this a file of rankings?)")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 text (byte "
                                 f"0x{raw[e.start]:02x} at column {e.start + 1})") from None
            yield lineno, text.rstrip("\r\n")

def build_from_lists(rankings, candidates, *, n_items, item_names, where):
    """Lists of orders (+ candidate sets) -> constructor fields. ``where(i)`` names record i
    in error messages (a list index or a file line)."""
    if isinstance(rankings, dict) or not hasattr(rankings, "__iter__"):
        raise TypeError(f"rankings: expected a sequence of orders, got "
                        f"{type(rankings).__name__}")
    rankings = list(rankings)
    n = len(rankings)
    if n == 0:
        raise ValueError("rankings: expected at least one ranking, got none")
    if candidates is not None:
        if isinstance(candidates, (str, bytes, dict)) or not hasattr(candidates, "__iter__"):
            raise TypeError(f"candidates: expected a sequence of candidate sets, got "
                            f"{type(candidates).__name__}")
        candidates = list(candidates)
    if candidates is not None and len(candidates) != n:
        raise ValueError(f"candidates: expected {n} candidate sets (one per ranking, None for "
                         f"none), got {len(candidates)}")
    # Item labels: all ints, or all strings (names).
    name_to_id = None
    names = None
    if item_names is not None:
        names = [str(x) for x in item_names]
        name_to_id = {nm: i for i, nm in enumerate(names)}
        if len(name_to_id) != len(names):
            raise ValueError("item_names: names must be distinct")
    kind = None

    def to_id(x, i):
        nonlocal kind, names, name_to_id
        if isinstance(x, (bool, np.bool_)):
            raise TypeError(f"{where(i)}: item {x!r} is a boolean; expected an integer id or a "
                            f"name")
        if isinstance(x, (int, np.integer)):
            if kind == "name":
                raise TypeError(f"{where(i)}: item {clip(x)} is an integer but earlier items "
                                f"are names; use one kind")
            kind = "id"
            x = int(x)
            if x < 0:
                raise ValueError(f"{where(i)}: item id {clip(x)} is negative; expected ids >= 0")
            if x > _I64_MAX:
                raise ValueError(f"{where(i)}: item id {clip(x)} is beyond int64")
            if n_items is not None and x >= n_items:
                raise ValueError(f"{where(i)}: item id {x} is out of range for n_items={n_items}")
            return x
        if isinstance(x, str):
            if kind == "id" and name_to_id is None:
                raise TypeError(f"{where(i)}: item {clip(x)} is a name but earlier items are "
                                f"integer ids; use one kind")
            kind = "name" if kind is None else kind
            if name_to_id is None:
                name_to_id, names = {}, []
            if x not in name_to_id:
                if item_names is not None:
                    raise ValueError(f"{where(i)}: item {clip(x)} is not in item_names")
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{where(i)}: item name {clip(x)} is not valid Unicode text "
                                     f"(it holds a lone surrogate) and cannot be printed or "
                                     f"written") from None
                name_to_id[x] = len(names)
                names.append(x)
            return name_to_id[x]
        raise TypeError(f"{where(i)}: item {clip(x)} has type {type(x).__name__}; expected an "
                        f"integer id or a string name")

    items, lengths, depths = [], [], []
    for i in range(n):
        ranking = rankings[i]
        if isinstance(ranking, (str, bytes)) or not hasattr(ranking, "__len__"):
            raise TypeError(f"{where(i)}: expected a list of items, got {type(ranking).__name__}")
        ranked = [to_id(x, i) for x in ranking]
        if len(ranked) == 0:
            raise ValueError(f"{where(i)}: empty ranking; every record must rank at least one "
                             f"item")
        dup = _first_repeat(ranked)
        if dup is not None:
            raise ValueError(f"{where(i)}: item {clip(ranking[dup])} appears twice in the ranking")
        cand = None if candidates is None else candidates[i]
        if cand is None:
            if len(ranked) == 1:
                raise ValueError(f"{where(i)}: a ranking of one item ({clip(ranking[0])}) with no "
                                 f"other candidates carries no information; give its candidate "
                                 f"set (items) or drop it")
            rest = []
        else:
            if isinstance(cand, (str, bytes)) or not hasattr(cand, "__len__"):
                raise TypeError(f"{where(i)}: expected a list of candidate items, got "
                                f"{type(cand).__name__}")
            cids = [to_id(x, i) for x in cand]
            dup = _first_repeat(cids)
            if dup is not None:
                raise ValueError(f"{where(i)}: candidate {clip(cand[dup])} appears twice in the "
                                 f"candidate set")
            cset = set(cids)
            missing = [x for x, r in zip(ranking, ranked) if r not in cset]
            if missing:
                raise ValueError(f"{where(i)}: ranked item {clip(missing[0])} is not in the candidate "
                                 f"set")
            if len(cids) < 2:
                raise ValueError(f"{where(i)}: the candidate set has {len(cids)} item(s); a "
                                 f"ranking needs at least 2 candidates")
            rset = set(ranked)
            rest = [c for c in cids if c not in rset]
        m = len(ranked) + len(rest)
        items.extend(ranked)
        items.extend(rest)
        lengths.append(m)
        depths.append(min(len(ranked), m - 1))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = np.asarray(items, dtype=np.int64)
    if n_items is None and names is not None:
        n_items = len(names)
    return dict(items=items, offsets=offsets, n_ranked=np.asarray(depths, dtype=np.int64),
                n_items=n_items, item_names=names)


def _first_repeat(ids):
    """Index of the first element equal to an earlier one, else None."""
    seen = set()
    for k, x in enumerate(ids):
        if x in seen:
            return k
        seen.add(x)
    return None


def _split_order(text: str, where: str):
    """'1,2,{3,4},5' -> [[1], [2], [3, 4], [5]] (groups of tied alternatives)."""
    groups, s = [], text.strip()
    if not s:
        return groups
    for part in _top_level_split(s, where):
        part = part.strip()
        if part.startswith("{"):
            if not part.endswith("}"):
                raise ValueError(f"{where}: unbalanced '{{' in {clip(text.strip())}")
            inner = part[1:-1].strip()
            members = [p.strip() for p in inner.split(",")] if inner else []
        else:
            members = [part]
        ids = []
        for p in members:
            try:
                ids.append(int(p))
            except ValueError:
                raise ValueError(f"{where}: {clip(p)} is not an alternative number") from None
        if ids:
            groups.append(ids)
    return groups


def _top_level_split(s: str, where: str):
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            if depth:
                raise ValueError(f"{where}: nested '{{' in {clip(s)}")
            depth = 1
        elif ch == "}":
            if not depth:
                raise ValueError(f"{where}: unbalanced '}}' in {clip(s)}")
            depth = 0
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"{where}: unbalanced '{{' in {clip(s)}")
    parts.append("".join(cur))
    return parts


_PREFLIB_KINDS = (".soc", ".soi", ".toc", ".toi")


def read_preflib(path: str, trailing_tie: str) -> dict:
    kind = os.path.splitext(path)[1].lower()
    if kind not in _PREFLIB_KINDS:
        raise ValueError(f"{path}: expected a PrefLib file of orders ending in "
                         f"{', '.join(_PREFLIB_KINDS)}, got {clip(kind) if kind else 'no extension'}")
    lines = [text for _, text in _text_lines(path)]
    n_alt, names, data_lines, announced = _preflib_header(lines, path)
    if n_alt < 2:
        raise ValueError(f"{path}: {n_alt} alternative(s); rankings need at least 2")
    # Every order lists all n_alt alternatives (the unranked ones after the ranked), so a
    # header may not announce far more alternatives than the file's orders mention.
    mentioned = sum(order.count(",") + 1 for _, _, _, order in data_lines)
    try:
        check_id_bound("NUMBER ALTERNATIVES", n_alt - 1, mentioned, count=True)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    items, lengths, depths, counts = [], [], [], []
    skipped = 0
    voters = 0
    for lineno, line, count_text, order_text in data_lines:
        where = f"{path}:{lineno}"
        try:
            count = int(count_text)
        except ValueError:
            raise ValueError(f"{where}: the count {clip(count_text.strip())} is not an "
                             f"integer") from None
        if count < 0:
            raise ValueError(f"{where}: negative count {clip(count)}")
        if count > _I64_MAX:
            raise ValueError(f"{where}: the count {clip(count)} is beyond int64")
        voters += count
        groups = _split_order(order_text, where)
        flat = [a for g in groups for a in g]
        for a in flat:
            if not 1 <= a <= n_alt:
                raise ValueError(f"{where}: alternative {a} is out of range 1..{n_alt}")
        if len(set(flat)) != len(flat):
            dup = next(a for k, a in enumerate(flat) if a in flat[:k])
            raise ValueError(f"{where}: alternative {dup} appears twice in the order")
        ties = [k for k, g in enumerate(groups) if len(g) > 1]
        if ties:
            last = len(groups) - 1
            if trailing_tie == "unranked" and ties == [last]:
                groups = groups[:last]
                # the tied bottom group joins the unranked rest
            else:
                g = groups[ties[0]]
                hint = ("; with trailing_tie='unranked' a tie in the last group is read as the "
                        "unranked rest" if trailing_tie == "reject" and ties[-1] == last
                        and len(ties) == 1 else "")
                raise ValueError(f"{where}: tie {{{','.join(map(str, g))}}}: the Plackett-Luce "
                                 f"model has no ties, so orders with ties are not supported"
                                 f"{hint}")
        ranked = [g[0] - 1 for g in groups]
        if kind == ".soc" and len(ranked) != n_alt:
            raise ValueError(f"{where}: a .soc order must list all {n_alt} alternatives, this one "
                             f"lists {len(ranked)} (is the file an .soi, incomplete orders?)")
        if not ranked:
            skipped += 1
            continue
        if count == 0:
            continue
        rset = set(ranked)
        rest = [a for a in range(n_alt) if a not in rset]
        items.extend(ranked)
        items.extend(rest)
        lengths.append(n_alt)
        depths.append(min(len(ranked), n_alt - 1))
        counts.append(count)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} empty order line(s): an empty order has "
                      f"likelihood 1 under every type and carries no information",
                      UserWarning, stacklevel=3)
    _check_announced(path, announced, voters, len(data_lines))
    if not lengths:
        raise ValueError(f"{path}: no orders with a positive count")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    counts = np.asarray(counts, dtype=np.float64)
    return dict(items=np.asarray(items, dtype=np.int64), offsets=offsets,
                n_ranked=np.asarray(depths, dtype=np.int64),
                sample_weight=None if np.all(counts == 1) else counts, n_items=n_alt,
                item_names=names)


def _check_announced(path, announced, voters, orders):
    """Warn when the header's counts of voters and unique orders differ from the file's (a
    truncated download reads without any other sign)."""
    want_v, want_u = announced.get("voters"), announced.get("orders")
    if (want_v is None or want_v == voters) and (want_u is None or want_u == orders):
        return
    said = " and ".join(x for x in (f"{want_v} voters" if want_v is not None else "",
                                    f"{want_u} unique orders" if want_u is not None else "") if x)
    short = (want_v is not None and voters < want_v) or (want_u is not None and orders < want_u)
    warnings.warn(f"{path}: the header announces {said}, the file holds {voters} voters in "
                  f"{orders} order line(s){' (is the file truncated?)' if short else ''}",
                  UserWarning, stacklevel=4)


def _announced_count(val):
    try:
        return int(val)
    except ValueError:
        return None       # informative header lines: a malformed one is not an error


def _preflib_header(lines, path):
    """(n_alternatives, names or None, [(lineno, line, count, order)], announced counts
    {"voters": int, "orders": int} as far as the header gives them)."""
    announced = {}
    content = [(k + 1, ln) for k, ln in enumerate(lines) if ln.strip()]
    if not content:
        raise ValueError(f"{path}: the file is empty")
    if content[0][1].lstrip().startswith("#"):
        n_alt, names = None, {}
        data = []
        for lineno, ln in content:
            s = ln.strip()
            if s.startswith("#"):
                key, _, val = s[1:].partition(":")
                key = key.strip().upper()
                if key == "NUMBER ALTERNATIVES":
                    try:
                        n_alt = int(val)
                    except ValueError:
                        raise ValueError(f"{path}:{lineno}: NUMBER ALTERNATIVES "
                                         f"{clip(val.strip())} is not an integer") from None
                elif key == "NUMBER VOTERS":
                    announced["voters"] = _announced_count(val)
                elif key == "NUMBER UNIQUE ORDERS":
                    announced["orders"] = _announced_count(val)
                elif key.startswith("ALTERNATIVE NAME"):
                    try:
                        names[int(key.split()[-1])] = val.strip()
                    except ValueError:
                        pass
                continue
            count, sep, order = s.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'count: a,b,c', got {clip(s)}")
            data.append((lineno, s, count, order))
        if n_alt is None:
            raise ValueError(f"{path}: no '# NUMBER ALTERNATIVES: n' header line")
    else:
        # Older format: n, then n lines "i,name", then "voters,sum,unique", then "count,a,b,c".
        lineno, first = content[0]
        try:
            n_alt = int(first.strip())
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected the number of alternatives (older "
                             f"PrefLib format) or '#' header lines, got "
                             f"{clip(first.strip())}") from None
        if len(content) < n_alt + 2:
            raise ValueError(f"{path}: truncated header: {n_alt} alternatives announced")
        names = {}
        for lineno, ln in content[1:n_alt + 1]:
            idx, _, nm = ln.partition(",")
            try:
                names[int(idx)] = nm.strip()
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'number,name', got "
                                 f"{clip(ln.strip())}") from None
        # then "voters,sum of counts,unique orders"
        parts = content[n_alt + 1][1].split(",")
        if len(parts) == 3:
            announced = {"voters": _announced_count(parts[0]),
                         "orders": _announced_count(parts[2])}
        data = []
        for lineno, ln in content[n_alt + 2:]:
            count, sep, order = ln.strip().partition(",")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'count,a,b,c', got "
                                 f"{clip(ln.strip())}")
            data.append((lineno, ln, count, order))
    name_list = [names.get(a, str(a)) for a in range(1, n_alt + 1)] if names else None
    return n_alt, name_list, data, announced


def json_objects(path):
    """(line number, dict) for every non-blank line of a JSON Lines file; a line that is not
    a JSON object is a ValueError naming the file and line."""
    path = os.fspath(path)
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}:{lineno}: JSON nested too deeply") from None
        except ValueError as e:      # e.g. an integer of more than 4300 digits
            raise ValueError(f"{path}:{lineno}: not valid JSON ({clip_message(e)})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                             f"{type(rec).__name__}")
        yield lineno, rec


def read_jsonl(path) -> dict:
    """JSON Lines of rankings -> RankingData constructor fields (see
    :meth:`RankingData.from_jsonl`). Errors name the file and line."""
    path = os.fspath(path)
    rankings, cands, annot, weights = [], [], [], []
    lines = []
    for lineno, rec in json_objects(path):
        unknown = set(rec) - {"annotator", "ranking", "items", "weight"}
        if unknown:
            raise ValueError(f"{path}:{lineno}: unknown keys {clip(sorted(unknown))}; expected "
                             f"'ranking' and optionally 'items', 'annotator', 'weight'")
        if "ranking" not in rec:
            raise ValueError(f"{path}:{lineno}: missing key 'ranking'")
        if not isinstance(rec["ranking"], list):
            raise ValueError(f"{path}:{lineno}: 'ranking' must be a list, got "
                             f"{type(rec['ranking']).__name__}")
        if "items" in rec and not isinstance(rec["items"], list):
            raise ValueError(f"{path}:{lineno}: 'items' must be a list, got "
                             f"{type(rec['items']).__name__}")
        rankings.append(rec["ranking"])
        cands.append(rec.get("items"))
        a = rec.get("annotator")
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, str))):
            raise ValueError(f"{path}:{lineno}: 'annotator' must be a string or an "
                             f"integer, got {clip(a)}")
        if isinstance(a, str):
            try:
                a.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path}:{lineno}: 'annotator' {clip(a)} is not valid Unicode "
                                 f"text (it holds a lone surrogate)") from None
        annot.append(a)
        w = rec.get("weight", 1)
        try:
            wf = float(w) if not isinstance(w, bool) and isinstance(w, (int, float)) else None
        except OverflowError:          # an integer beyond the float range
            wf = math.inf
        if wf is None or not math.isfinite(wf) or wf < 0:
            raise ValueError(f"{path}:{lineno}: 'weight' must be a finite number >= 0, "
                             f"got {clip(w)}")
        weights.append(wf)
        lines.append(lineno)
    if not rankings:
        raise ValueError(f"{path}: no records (the file is empty)")
    has = [a is not None for a in annot]
    if any(has) and not all(has):
        i = has.index(not has[0])
        raise ValueError(f"{path}:{lines[i]}: 'annotator' is given on some lines and not on "
                         f"others (line {lines[0]} {'has' if has[0] else 'has none'}); give "
                         f"it on every line or on none")
    if all(has):
        kinds = {type(a) for a in annot}
        if len(kinds) > 1:
            raise ValueError(f"{path}: 'annotator' mixes strings and integers; use one kind")
    fields = build_from_lists(rankings, cands if any(c is not None for c in cands) else None,
                              n_items=None, item_names=None,
                              where=lambda i: f"{path}:{lines[i]}")
    sw = np.asarray(weights)
    return dict(**fields, annotator=np.asarray(annot) if all(has) else None,
                sample_weight=None if np.all(sw == 1.0) else sw)
