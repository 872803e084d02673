"""Shared test helpers: random ragged ranking layouts and the tolerance table."""

from __future__ import annotations

import tempfile
import zlib

import numpy as np
import pytest

# Child Python processes run from outside the source tree, so that they import the
# installed package (with its compiled module) rather than the bare emdpo_core/ folder.
SUBPROCESS_CWD = tempfile.gettempdir()

# One tolerance table, keyed by dtype: (rtol, atol) for values and gradients against the
# float64 reference. float64: the kernels do the same arithmetic in another order, so
# agreement is limited by rounding of O(m) terms (~1e-13 relative); 1e-10 leaves margin.
# float32: per-record math runs in float32 (eps 1.2e-7); with sums over up to 300 slots and
# rewards of magnitude ~100 the relative error stays below 1e-5; 1e-4 is the project's bound.
TOL = {
    np.float64: dict(rtol=1e-10, atol=1e-10),
    np.float32: dict(rtol=1e-4, atol=1e-4),
}


def random_layout(rng, n_records, min_len=2, max_len=12, partial=True):
    """Ragged record layout: (offsets (N+1,), n_ranked (N,) or None)."""
    m = rng.integers(min_len, max_len + 1, size=n_records)
    offsets = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    n_ranked = None
    if partial:
        n_ranked = np.array([rng.integers(1, mi) for mi in m], dtype=np.int64)
    return offsets, n_ranked


def random_logps(rng, K, M, dtype=np.float64, center=-40.0, scale=3.0):
    p = rng.normal(center, scale, size=(K, M)).astype(dtype)
    ref = rng.normal(center, scale, size=M).astype(dtype)
    return p, ref


@pytest.fixture
def rng(request):
    # A fresh seed per test, derived from the test's name: reproducible, never shared.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
