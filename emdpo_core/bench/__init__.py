"""`emdpo bench`: the benchmark harness, its cases and their baselines."""

from .cases import (BETA, CASES, FIELDS, QUICK, Layout, Recorder, Sizes, Timings,  # noqa: F401
                    add_parser, copy_bandwidth, git_commit, make_layout, run)

__all__ = ["add_parser", "run", "CASES", "FIELDS"]
