"""Benchmarks: ``emdpo bench`` (:mod:`.cases`: the table of cases and the command; the cases
in :mod:`.kernel_cases` and :mod:`.solver_cases`, their sizes and data in :mod:`.workload`)
and what the scripts in ``benchmarks/`` share with it: the harness (:mod:`.harness`: machine
description, commit, interleaved timing, copy bandwidth, CSV rows), the baselines
(:mod:`.numpy_baseline`, :mod:`.torch_baseline`, the latter imports torch) and
:mod:`.routines` (the reference oracles and inner routines timed on their own)."""

from . import harness
from .cases import CASES, add_parser, run  # noqa: F401
from .harness import FIELDS, Recorder, Timings, copy_bandwidth, git_commit  # noqa: F401
from .workload import BETA, QUICK, Layout, Sizes, make_layout  # noqa: F401

__all__ = ["add_parser", "run", "CASES", "FIELDS"]
