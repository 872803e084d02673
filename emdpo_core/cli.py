"""The ``emdpo`` command line: ``emdpo demo``, ``emdpo fit`` and ``emdpo bench``.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments
and ``_run_<name>(args)`` runs it and returns the exit status. ``main`` dispatches. Errors in
the user's input print one line ``emdpo <cmd>: error: ...`` on stderr and exit with status 1;
usage errors exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

import numpy as np

__all__ = ["main"]


# ----------------------------------------------------------------------------------------
# emdpo fit


# At most this many values of K in one --types (each is a whole fit with restarts).
MAX_TYPES_LISTED = 64


def _parse_types(text: str) -> List[int]:
    """'3' -> [3]; '1-3' -> [1, 2, 3]; '1,2,4' -> [1, 2, 4]."""
    from ._checks import clip

    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            count = hi - lo + 1          # checked before a list of that size is made
            ks = list(range(lo, hi + 1)) if count <= MAX_TYPES_LISTED else None
        else:
            ks = [int(x) for x in text.split(",")]
            count = len(ks)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected K, a range 'K1-K2' or a list 'K1,K2,...', got {clip(text)}") from None
    if count > MAX_TYPES_LISTED:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_TYPES_LISTED} values of K at once, got {clip(text)} ({count} values)")
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of types >= 1, got {clip(text)}")
    return ks


def _int_at_least(minimum: int):
    """argparse type: an int >= minimum (and within int64)."""
    def parse(text: str) -> int:
        from ._checks import clip

        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {clip(text)}") from None
        if not minimum <= v < 2 ** 63:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got "
                                             f"{clip(v)}")
        return v

    parse.__name__ = f"int >= {minimum}"
    return parse


def _add_fit(sub) -> None:
    p = sub.add_parser(
        "fit", help="fit a mixture of Plackett-Luce types to a ranking file",
        description="Fit a K-type Plackett-Luce mixture (EM-DPO with tabular policies) to a "
                    "PrefLib (.soc, .soi, .toc/.toi without ties) or JSON Lines file of "
                    "rankings. Prints the type weights, each type's top items, the "
                    "log-likelihood and BIC; with --output writes fit.json and model.npz.")
    p.add_argument("rankings", help="PrefLib file (.soc/.soi/.toc/.toi) or JSONL file "
                                    "(.jsonl/.json: one {\"ranking\": [...], ...} per line)")
    p.add_argument("--types", "-k", type=_parse_types, required=True, metavar="K",
                   help="number of latent types; a range '1-3' or list '1,2,4' fits each and "
                        "picks the lowest BIC")
    p.add_argument("--restarts", type=_int_at_least(1), default=5, metavar="N",
                   help="EM restarts per K, the best is kept (default 5)")
    p.add_argument("--output", "-o", metavar="DIR", help="write DIR/fit.json and DIR/model.npz")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default 0)")
    p.add_argument("--max-iter", type=_int_at_least(1), default=1000,
                   help="EM iterations per restart (default 1000)")
    p.add_argument("--tol", type=float, default=1e-7,
                   help="convergence tolerance on the objective per record (default 1e-7)")
    p.add_argument("--pseudo-count", type=float, default=0.01,
                   help="virtual wins and losses per item and type (0 = maximum likelihood; "
                        "default 0.01)")
    p.add_argument("--top", type=_int_at_least(1), default=5,
                   help="top items shown per type (default 5)")
    p.add_argument("--format", choices=("auto", "preflib", "jsonl"), default="auto",
                   help="input format (default: from the file extension)")
    p.add_argument("--trailing-tie", choices=("reject", "unranked"), default="reject",
                   help="PrefLib: read a tie in the last group of an order as the unranked "
                        "rest (default: reject ties)")
    p.add_argument("--verbose", "-v", action="count", default=0, help="progress bar (-vv: "
                                                                      "per-iteration lines)")


def _load_rankings(args):
    from .data import RankingData

    path = args.rankings
    fmt = args.format
    if fmt == "auto":
        ext = os.path.splitext(path)[1].lower()
        if ext in (".soc", ".soi", ".toc", ".toi"):
            fmt = "preflib"
        elif ext in (".jsonl", ".json", ".ndjson"):
            fmt = "jsonl"
        else:
            raise ValueError(f"{path}: cannot tell the format from the extension {ext!r}; use "
                             f"--format preflib or --format jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if fmt == "preflib":
        return RankingData.from_preflib(path, trailing_tie=args.trailing_tie)
    return RankingData.from_jsonl(path)


def _item_name(data, i: int) -> str:
    return data.item_names[i] if data.item_names is not None else str(i)


def _fit_summary(model, data, top: int) -> dict:
    order = np.argsort(-model.weights_, kind="stable")
    types = []
    for k in order:
        lw = model.log_worths_[k]
        best = np.argsort(-lw, kind="stable")[:top]
        types.append({"type": int(k), "weight": float(model.weights_[k]),
                      "top_items": [_item_name(data, int(i)) for i in best],
                      "log_worths": lw.tolist()})
    return {"n_components": int(model.n_components_), "loglik": model.loglik_,
            "lower_bound": model.lower_bound_, "bic": model.bic(), "aic": model.aic(),
            "n_parameters": model.n_parameters(), "converged": model.converged_,
            "n_iter": model.n_iter_, "restarts": model.restarts_,
            "dropped_components": model.dropped_components_, "types": types}


def _print_fit(model, data, summary, out) -> None:
    print(f"{summary['n_components']} type(s), log-likelihood {summary['loglik']:.4f}, "
          f"BIC {summary['bic']:.4f}, AIC {summary['aic']:.4f}, {summary['n_iter']} iterations"
          f"{'' if summary['converged'] else ' (not converged)'}", file=out)
    print(f"{'type':>4}  {'weight':>7}  top items (best first)", file=out)
    for t in summary["types"]:
        print(f"{t['type']:>4}  {t['weight']:>7.4f}  {' > '.join(t['top_items'])}", file=out)


def _run_fit(args) -> int:
    from . import diagnostics
    from .em import PlackettLuceMixture, select_n_components

    out = sys.stdout
    data = _load_rankings(args)
    ks = args.types
    params = dict(n_init=args.restarts, random_state=args.seed, max_iter=args.max_iter,
                  tol=args.tol, pseudo_count=args.pseudo_count, verbose=min(args.verbose, 2))
    g = data.grouped()
    print(f"{args.rankings}: {data.n_records} distinct records, {g.total_weight:g} rankings "
          f"after counts, {data.n_items} items", file=out)
    rep = diagnostics.identifiability(data, max(ks))
    for msg in rep.warnings:
        print(f"warning: {msg}", file=out)
    for msg in rep.notes:
        print(f"note: {msg}", file=out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=diagnostics.IdentifiabilityWarning)
        if len(ks) == 1:
            model = PlackettLuceMixture(ks[0], **params).fit(data)
            selection = None
        else:
            selection = select_n_components(data, ks, **params)
            model = selection.best_model
    for w in caught:
        print(f"warning: {w.message}", file=out)
    if selection is not None:
        print(selection, file=out)
        print(f"lowest BIC: K = {selection.best_n_components}", file=out)
    summary = _fit_summary(model, data, args.top)
    _print_fit(model, data, summary, out)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        from . import __version__

        report = {"input": os.path.basename(args.rankings), "version": __version__,
                  "n_records": data.n_records, "n_rankings": g.total_weight,
                  "n_annotators": g.annotator_total, "n_items": data.n_items,
                  "item_names": data.item_names,
                  "identifiability": rep.to_dict(),
                  "params": {k: v for k, v in params.items() if k != "verbose"},
                  "fit": summary}
        if selection is not None:
            report["selection"] = {"criterion": selection.criterion, "rows": selection.rows,
                                   "best_n_components": selection.best_n_components}
        from ._io import atomic_write

        with atomic_write(os.path.join(args.output, "fit.json"), "w") as f:
            json.dump(report, f, indent=2, default=_json_default)
        model.save(os.path.join(args.output, "model.npz"))
        print(f"wrote {os.path.join(args.output, 'fit.json')} and "
              f"{os.path.join(args.output, 'model.npz')}", file=out)
    return 0


def _json_default(x):
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


# ----------------------------------------------------------------------------------------
# emdpo demo


def _add_demo(sub) -> None:
    # Declared like fit's parser (the same argparse calls, other texts): nothing to share.
    p = sub.add_parser(
        "demo", help="run EM-DPO end to end on built-in synthetic data",
        description="EM-DPO end to end on built-in synthetic data, no download. It measures: "
                    "(1) the policy error of 2-type fits: with one record per annotator, "
                    "pairs cannot identify the latent types and rankings of 3 can; pairs with "
                    "several per annotator are identified through the correlation within "
                    "each annotator's pairs; (2) EM-DPO with torch policies on 3 types: type "
                    "recovery (adjusted Rand index), higher than the clustering of "
                    "cluster-DPO, and per-type accuracy on held-out annotators and prompts, "
                    "where EM-DPO and cluster-DPO agree within noise and single DPO fails the "
                    "minority type; (3) MinMax Regret Aggregation of the type policies, "
                    "estimated and scored on 128 prompts held out from training: its "
                    "worst-type true regret against the uniform mixture and single DPO. "
                    "Prints tables and checks, and writes DIR/report.json and "
                    "DIR/emdpo-demo.png. Needs torch (and cvxpy for the exact MMRA LP, "
                    "matplotlib for the figure).")
    p.add_argument("--output", "-o", metavar="DIR", default="emdpo-demo",
                   help="folder for report.json and emdpo-demo.png (default: ./emdpo-demo, "
                        "a folder emdpo-demo in the current directory)")
    p.add_argument("--quick", action="store_true",
                   help="smaller populations: under a minute on a 2-core CPU")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_demo(args) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("the demo trains torch policies; pip install torch "
                         "(or emdpo-core[all])") from None
    from .demo import run_demo

    if args.seed < 0:
        raise ValueError(f"--seed: expected an int >= 0, got {args.seed}")
    run_demo(args.output, quick=args.quick, seed=args.seed)
    return 0


# ----------------------------------------------------------------------------------------
# emdpo bench: emdpo_core/bench/ (add_parser, run).
from . import bench as _bench  # noqa: E402  (imports only numpy at import time)

# (name, declare arguments, run); add new subcommands here.
_COMMANDS = [
    ("demo", _add_demo, _run_demo),
    ("fit", _add_fit, _run_fit),
    ("bench", _bench.add_parser, _bench.run),
]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, ``emdpo fit: error: ... (see emdpo fit --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message) -> str:
    from ._checks import clip_message

    return clip_message(message)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="emdpo", description="EM-DPO: EM over latent annotator types with listwise "
                                  "(Plackett-Luce) preferences.")
    parser.add_argument("--version", action="version", version=f"emdpo-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _, add, _ in _COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``emdpo`` console script; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):
        # names that the terminal's encoding cannot show are printed escaped, not fatal
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    args = _parser().parse_args(argv)
    run = {name: fn for name, _, fn in _COMMANDS}[args.command]
    try:
        return run(args)
    except BrokenPipeError:
        # The reader went away (`emdpo ... | head`): stop quietly, as Unix tools do. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError) as e:
        print(f"emdpo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RecursionError, ArithmeticError) as e:
        # the input's own checks should have caught it first; still one line, never a trace
        print(f"emdpo {args.command}: error: {type(e).__name__}: {_one_line(e) or 'no detail'}"
              f" (the input is too large or too deeply nested)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"emdpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
