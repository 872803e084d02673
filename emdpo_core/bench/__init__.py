"""Benchmarks: ``emdpo bench`` (:mod:`.cases`: the suite and its command) and what the
scripts in ``benchmarks/`` share with it: the harness (:mod:`.harness`: machine description,
commit, interleaved timing, copy bandwidth, CSV rows), the baselines (:mod:`.numpy_baseline`,
:mod:`.torch_baseline`, the latter imports torch) and :mod:`.routines` (the reference oracles
and inner routines timed on their own)."""

from . import harness
from .cases import (BETA, CASES, QUICK, Layout, Sizes, add_parser, make_layout,  # noqa: F401
                    run)
from .harness import FIELDS, Recorder, Timings, copy_bandwidth, git_commit  # noqa: F401

__all__ = ["add_parser", "run", "CASES", "FIELDS"]
