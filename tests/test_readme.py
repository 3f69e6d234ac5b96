"""The README's self-contained examples (blocks that start with imports) run."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(),
                                re.S) if b.startswith("import")]


def test_readme_has_runnable_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.splitlines()[0])
def test_readme_example_runs(block):
  exec(compile(block, str(README), "exec"), {})
