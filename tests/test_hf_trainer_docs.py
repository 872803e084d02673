"""docs/hf.md runs end to end: its Python blocks, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_utils import require_hf

require_hf()
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("cvxpy")

DOC = Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def test_docs_hf_runs(tmp_path, monkeypatch):
    import torch

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)          # the examples write emdpo-hf-docs/ here
    n = torch.get_num_threads()
    torch.set_num_threads(1)             # tiny model on a shared 2-core machine
    try:
        namespace = {}
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/hf.md block {i}", "exec"), namespace)
    finally:
        torch.set_num_threads(n)
    trainer, mixture = namespace["trainer"], namespace["mixture"]
    assert trainer.responsibilities_.shape == (12, 2)
    assert abs(mixture.weights.sum() - 1) < 1e-9
    assert (tmp_path / "emdpo-hf-docs" / "policy" / "mixture.json").is_file()
