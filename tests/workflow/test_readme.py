"""The README's Python blocks run as written (each in a fresh namespace, from an empty working directory)."""

import os
import re
import textwrap

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
OPTIONAL_EXTRAS = ("flwr_datasets", "datasets", "torch")


def python_blocks() -> list[str]:
    with open(README) as f:
        # A block inside a list item is indented with it: dedented, as a reader copies it.
        return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)]


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    block = python_blocks()[index]
    for extra in OPTIONAL_EXTRAS:  # a block that shows an optional extra runs where the extra is installed
        if re.search(rf"^\s*(from|import) {extra}\b", block, flags=re.MULTILINE):
            pytest.importorskip(extra)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # each block ends by printing its figures
