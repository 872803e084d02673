"""Every Python example in README.md runs as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    needs = set(re.findall(r"^\s*import (\w+)", code, flags=re.M))
    if "ec.mmra(" in code or ".aggregate(" in code:
        needs.add("cvxpy")  # the LP solver, imported inside mmra
    for module in sorted(needs):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    exec(compile(code, f"README.md example {index}", "exec"), {})
