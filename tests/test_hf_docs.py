"""The examples of docs/hf_data.md run as written, in order, in one namespace (later blocks
use the tokenizer and model built by earlier ones), and print what their comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from hf_utils import require_hf

require_hf()

DOC = Path(__file__).resolve().parents[1] / "docs" / "hf_data.md"


def test_hf_data_doc_examples_run_and_print_what_they_say():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, code in enumerate(blocks):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"docs/hf_data.md example {i}", "exec"), namespace)
        printed = out.getvalue().splitlines()
        # Each `print(...)  # expected` comment: the expected text starts the printed line
        # (long lines are shortened with "..." in the doc).
        expected = [c.strip() for c in re.findall(r"print\(.*\)\s*#(.*)$", code, flags=re.M)]
        expected += [c.strip() for c in re.findall(r"^# (\[.*)$", code, flags=re.M)]
        for want in expected:
            prefix = want.split("...")[0].rstrip()
            assert any(line.startswith(prefix) for line in printed), (i, want, printed)
