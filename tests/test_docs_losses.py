"""The code blocks of docs/losses.md marked ``<!-- tested -->`` run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
BLOCK = re.compile(r"^<!-- tested -->\n```python\n(.*?)^```", re.S | re.M)


def marked_blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text())


def test_docs_mark_the_causal_lm_and_trainer_examples():
    blocks = marked_blocks()
    assert len(blocks) == 2
    assert "LlamaForCausalLM" in blocks[0] and "DistillationTrainer" in blocks[1]


@pytest.mark.parametrize("index", range(2))
def test_doc_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(marked_blocks()[index], f"{DOC}:tested block {index}", "exec"), {"__name__": "__doc_example__"})
