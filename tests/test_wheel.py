"""The installed distribution: metadata, console script, and a CUDA build that still works
on a machine without a GPU driver (the CUDA runtime is linked statically).

.ci/wheel_smoke.sh runs these (marker `smoke`) against a freshly installed wheel.
"""

from __future__ import annotations

import ctypes
import importlib.metadata as md
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SUBPROCESS_CWD, TOL

import emdpo_core as ec
from emdpo_core import _core
from emdpo_core.ops import _reference as ref

pytestmark = pytest.mark.smoke


def _driver_loadable() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_distribution_metadata_and_license():
    dist = md.distribution("emdpo-core")
    assert dist.version == ec.__version__
    assert "Apache-2.0" in (dist.metadata.get("License") or dist.metadata.get(
        "License-Expression") or "")
    names = [p.name for p in (dist.files or [])]
    assert "LICENSE" in names, names
    assert {"numpy", "numba", "tqdm"} <= {r.split(">")[0].split("=")[0].strip().lower()
                                          for r in (dist.requires or []) if "extra" not in r}


def test_console_script_runs():
    exe = shutil.which("emdpo", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no `emdpo` console script next to this Python (not a pip install)")
    out = subprocess.run([exe, "--version"], cwd=SUBPROCESS_CWD, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"emdpo-core {ec.__version__}"


def test_build_commit_is_recorded():
    from emdpo_core import bench
    import re

    commit = bench.git_commit()
    # "unknown", a short sha (+ "-dirty"), or what EMDPO_GIT_COMMIT said at build time
    # (CMakeLists.txt keeps only these characters).
    assert re.fullmatch(r"[0-9A-Za-z._+-]+", commit), commit


@pytest.mark.skipif(not _core.cuda, reason="a CPU-only build (EMDPO_WITH_CUDA=OFF or no nvcc)")
@pytest.mark.skipif(_driver_loadable(), reason="a CUDA driver is present: the no-driver case "
                                               "cannot be checked here")
def test_cuda_build_without_a_driver_runs_its_cpu_path_and_refuses_cuda_calls():
    # Importing already worked (libcudart is static; no libcuda.so is linked). The CPU
    # kernels give the reference's numbers.
    rng = np.random.default_rng(11)
    p, r = rng.normal(-40, 3, (3, 40)), rng.normal(-40, 3, 40)
    offsets, aoff, log_w = np.arange(0, 41, 4), np.array([0, 4, 10]), np.log([0.2, 0.3, 0.5])
    got = ec.e_step(p, r, offsets, aoff, log_w, beta=0.5)
    want = ref.e_step(p, r, offsets, aoff, log_w, beta=0.5)
    np.testing.assert_allclose(got.responsibilities, want[0], **TOL[np.float64])
    # A CUDA entry point raises (the runtime fails at its first call, before any pointer is
    # used on the device), it does not crash the process.
    fake = 1 << 20   # non-null "device pointers", never dereferenced on the host
    with pytest.raises(RuntimeError, match="cuda|CUDA"):
        _core.cuda_listwise_loglik("float64", fake, fake, fake, 0, 1, 2, 1, 1.0, fake, fake, 0)
