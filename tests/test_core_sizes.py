"""Direct calls of the private compiled functions with absurd sizes and mismatched buffers.

The bindings take sizes as arbitrary int64 values next to the buffers; a size product that
overflows int64 could wrap around to the length of a real buffer and send a kernel far out of
bounds. Every call here must raise ValueError or TypeError; none may end the process. The
calls run in a child interpreter so that a crash fails the test instead of the suite.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import SUBPROCESS_CWD

# What both scripts start with: the cases table, filled by the script, run by RUN_CASES.
CASES = r"""
import numpy as np
from emdpo_core import _core

BIG = 2**63 - 1
K_WRAP = 2**62 + 1           # K_WRAP * 8 = 8 and K_WRAP * 4 = 4 (mod 2^64)
cases = {}

def case(name):
    def register(fn):
        cases[name] = fn
        return fn
    return register
"""

# Every case must raise ValueError or TypeError. Any other exception (for the CUDA entry
# points: a RuntimeError from a call that reached the CUDA runtime) is printed as UNEXPECTED
# and fails the test, after the remaining cases have run.
RUN_CASES = r"""
for name, fn in cases.items():
    print(name, "...", end=" ", flush=True)
    try:
        fn()
    except (ValueError, TypeError) as e:
        print("raised", type(e).__name__, str(e)[:100], flush=True)
    except Exception as e:
        print("UNEXPECTED", type(e).__name__, str(e)[:100], flush=True)
    else:
        print("RETURNED", flush=True)
print("done")
"""


def run_cases(script):
    """CASES + script + RUN_CASES in a child interpreter, so that a crash fails the test
    instead of the suite; asserts it ended normally, ran to the end, and that every case
    raised ValueError or TypeError. Returns its stdout."""
    out = subprocess.run([sys.executable, "-c", CASES + script + RUN_CASES], cwd=SUBPROCESS_CWD,
                         capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"the process ended with {out.returncode}:\n{log}"
    assert out.stdout.strip().endswith("done"), log
    assert "RETURNED" not in out.stdout and "UNEXPECTED" not in out.stdout, log
    return out.stdout


SCRIPT = r"""
f8, i8 = np.float64, np.int64
off = lambda *v: np.array(v, dtype=i8)

# 4 pairs (N = 4, M = 8) with K = 2^62 + 1 types: K * M = 8 (mod 2^64) and N * K = 4, the
# lengths of the buffers passed, so only an overflow check stands between this and the kernel.
p8, r8, o4 = np.zeros(8), np.zeros(8), off(0, 2, 4, 6, 8)

@case("listwise_loglik K*M wraps")
def _():
    _core.listwise_loglik(p8, r8, o4, None, 4, 8, K_WRAP, 1.0, np.empty(4))

@case("listwise_loglik K = 2^53")
def _():
    _core.listwise_loglik(p8, r8, o4, None, 4, 8, 2**53, 1.0, np.empty(4))

@case("listwise_loglik N = int64 max")
def _():
    _core.listwise_loglik(p8, r8, o4, None, BIG, 8, 1, 1.0, np.empty(4))

@case("listwise_loglik negative K")
def _():
    _core.listwise_loglik(p8, r8, o4, None, 4, 8, -1, 1.0, np.empty(4))

@case("e_step K*M wraps")
def _():
    _core.e_step(p8, r8, o4, None, None, off(0, 4), np.zeros(1), 4, 8, K_WRAP, 1, 1.0,
                 np.empty(1), np.empty(1), np.empty(4))

@case("e_step H = int64 max")
def _():
    _core.e_step(p8, r8, o4, None, None, off(0, 4), np.zeros(1), 4, 8, 1, BIG, 1.0,
                 np.empty(1), np.empty(1), None)

@case("e_step H*K wraps")
def _():
    # H = 2^62 + 1 annotators of K = 4 types: H * K = 4 (mod 2^64); annotator_offsets has 2.
    _core.e_step(np.zeros((4, 8)), r8, o4, None, None, off(0, 4), np.zeros(4), 4, 8, 4,
                 2**62 + 1, 1.0, np.empty(4), np.empty(4), None)

@case("e_step annotator_weights wrong size")
def _():
    _core.e_step(p8, r8, o4, None, None, off(0, 4), np.zeros(1), 4, 8, 1, 1, 1.0,
                 np.empty(1), np.empty(1), None, annotator_weights=np.ones(5))

@case("loss K*M and K*N wrap")
def _():
    _core.listwise_dpo_loss_and_grad(p8, r8, o4, None, np.ones(4), np.ones(1), 4, 8, K_WRAP,
                                     1.0, np.empty(8), np.empty(4))

@case("loss scale K = 2^53")
def _():
    _core.listwise_dpo_loss_and_grad(p8, r8, o4, None, None, np.ones(1), 4, 8, 2**53, 1.0,
                                     np.empty(8), None)

@case("regret_matrix K*S wraps (kind kl)")
def _():
    # S = 2^62 samples of K = 4 sources: K * S = 0 (mod 2^64), the length of sample_logps.
    _core.regret_matrix(np.zeros(0), None, off(0, 1, 2, 3, 2**62), None, 4, 2**62, 1, 1.0,
                        np.empty(16))

@case("regret_matrix K*K wraps")
def _():
    _core.regret_matrix(np.zeros(0), None, off(0, 1), None, 2**32, 1, 1, 1.0, np.empty(0))

@case("regret_matrix S = int64 max")
def _():
    _core.regret_matrix(np.zeros(2), np.zeros(2), off(0, 2), None, 1, BIG, 0, 1.0, np.empty(1))

@case("first_bad_offset huge min_gap")
def _():
    r = _core.first_bad_offset(off(0, 5, 9), 9, BIG)
    if r != 1:
        raise AssertionError(r)
    raise ValueError("checked")   # a valid answer for an absurd gap is fine too

@case("first_bad_offset negative min_gap")
def _():
    _core.first_bad_offset(off(0, 5, 9), 9, -BIG)

@case("first_bad_offset offsets near int64 min")
def _():
    r = _core.first_bad_offset(off(0, -BIG - 1, 9), 9, 2)
    if r != 1:
        raise AssertionError(r)
    raise ValueError("checked")
"""


def test_absurd_sizes_raise_instead_of_crashing():
    run_cases(SCRIPT)


# The CUDA entry points take device pointers as integers, which nothing can measure: the sizes
# next to them are checked in the bindings before any CUDA call, so these run on any CUDA
# build, with or without a device. The pointers are made up and must never be used: a call
# that reaches the CUDA runtime (RuntimeError without a device, a kernel on made-up pointers
# with one) fails the test.
CUDA_SCRIPT = r"""
P = 1 << 20                  # a made-up, non-null "device pointer"

def loglik(N, M, K):
    _core.cuda_listwise_loglik("float64", P, P, P, 0, N, M, K, 1.0, P, P, 0)

def e_step(N, M, K, H):
    _core.cuda_e_step("float64", P, P, P, 0, 0, P, P, N, M, K, H, 1.0, P, P, P, 0, P, P,
                      1 << 40, 0)

def loss(N, M, K):
    _core.cuda_listwise_dpo_loss_and_grad("float64", P, P, P, 0, P, P, N, M, K, 1.0, P, P, 0,
                                          P, P, 1 << 40, 0)

def regret(K, S):
    _core.cuda_regret_matrix("float64", P, P, P, 0, K, S, 0, 1.0, P, P, P, 1 << 40, 0)

for name, fn, args in [
        ("listwise_loglik", loglik, {"K*M wraps": (4, 8, K_WRAP), "K = 2^53": (4, 8, 2**53),
                                     "N = int64 max": (BIG, 8, 1), "negative K": (4, 8, -1),
                                     "negative N": (-4, 8, 1), "M = 1": (4, 1, 1),
                                     "M = 2^31": (4, 2**31, 1),
                                     "N*K bytes overflow": (2**61, 8, 2),
                                     "N = 2^40 (2^32 blocks)": (2**40, 8, 1)}),
        ("loss", loss, {"K*M and N*K wrap": (4, 8, K_WRAP), "K = 2^53": (4, 8, 2**53),
                        "N = int64 max": (BIG, 8, 1), "negative M": (4, -8, 1),
                        "K = 0": (4, 8, 0), "N = 2^40 (2^32 blocks)": (2**40, 8, 1)}),
        ("e_step", e_step, {"H*K wraps": (4, 8, 4, K_WRAP), "H = int64 max": (4, 8, 1, BIG),
                            "negative H": (4, 8, 1, -1), "K*M wraps": (4, 8, K_WRAP, 1),
                            "K = 0": (4, 8, 0, 1), "H = 0": (4, 8, 1, 0),
                            "N = 2^40 (2^32 blocks)": (2**40, 8, 1, 1)}),
        ("regret_matrix", regret, {"K*S wraps": (4, 2**62), "K = 2^32 (K*K wraps)": (2**32, 4),
                                   "K = 0": (0, 4), "S = int64 max": (1, BIG)}),
        ("e_step_workspace_bytes", _core.cuda_e_step_workspace_bytes,
         {"H*K wraps": (4, K_WRAP, 4), "N = int64 max": (BIG, 1, 1), "K = 0": (4, 1, 0),
          "negative H": (4, -1, 1)}),
        ("loss_workspace_bytes", _core.cuda_loss_workspace_bytes,
         {"N = int64 max": (BIG, 1), "negative K": (4, -1), "N*K wraps": (K_WRAP, 4)}),
        ("regret_matrix_workspace_bytes", _core.cuda_regret_matrix_workspace_bytes,
         {"K = 0": (0, 4), "K*S wraps": (4, 2**62), "K = 2^32": (2**32, 1)}),
]:
    for what, a in args.items():
        cases[f"cuda_{name} {what}"] = (lambda fn=fn, a=a: fn(*a))
"""


def test_absurd_sizes_raise_before_any_cuda_call():
    from emdpo_core import _core

    if not _core.cuda:
        pytest.skip("emdpo_core was built without CUDA (build_info()['cuda'] is False): no "
                    "CUDA entry points to call")
    stdout = run_cases(CUDA_SCRIPT)
    assert stdout.count("raised ValueError") == stdout.count(" ... "), stdout
