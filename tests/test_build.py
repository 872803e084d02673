"""The package says what it was built with, from one version source."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import emdpo_core as ec
from conftest import SUBPROCESS_CWD

# The fast subset run against an installed wheel (`pytest -m smoke`, .ci/wheel_smoke.sh).
pytestmark = pytest.mark.smoke

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_build_info_keys():
    info = ec.build_info()
    for key, typ in [("version", str), ("cuda", bool), ("openmp", bool), ("num_threads", int),
                     ("cxx_compiler", str)]:
        assert isinstance(info[key], typ), key
    if info["cuda"]:
        assert isinstance(info["cuda_compiler"], str) and info["cuda_architectures"]


def test_version_has_one_source():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert ec.__version__ == project["version"] == ec.build_info()["version"]


def test_public_api_is_exported():
    for name in ec.__all__:
        assert hasattr(ec, name), name


def test_numpy_path_does_not_import_torch():
    import subprocess
    code = ("import sys, numpy as np, emdpo_core as ec; "
            "ec.listwise_loglik(np.zeros((1, 2)), np.zeros(2), [0, 2], beta=1.0); "
            "print('torch' in sys.modules)")
    out = subprocess.run(cwd=SUBPROCESS_CWD, args=[sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
