"""docs/hf.md runs end to end: its Python blocks, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import single_torch_thread
from hf_utils import require_hf

require_hf()
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("cvxpy")

DOC = Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def test_docs_hf_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)          # the examples write emdpo-hf-docs/ here
    namespace = {}
    with single_torch_thread():          # tiny model on a shared 2-core machine
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/hf.md block {i}", "exec"), namespace)
    trainer, mixture = namespace["trainer"], namespace["mixture"]
    assert trainer.responsibilities_.shape == (12, 2)
    assert abs(mixture.weights.sum() - 1) < 1e-9
    assert (tmp_path / "emdpo-hf-docs" / "policy" / "mixture.json").is_file()
