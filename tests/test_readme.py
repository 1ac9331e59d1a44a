"""README.md's python code blocks run as written.

Each ```python block is a copy-paste quickstart: it runs alone, top to bottom, in a fresh
interpreter (what a user pasting it gets; no state from other tests), without an error.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _blocks() -> list[tuple[str, str]]:
    """``(id, source)`` of every python block; the id is the section heading + line."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        heads = re.findall(r"^#+ +(.+)$", text[:m.start()], re.M)
        head = re.sub(r"\W+", "_", heads[-1]).strip("_").lower() if heads else "top"
        out.append((f"{head}_L{line}", m.group(1)))
    return out


BLOCKS = _blocks()


def test_readme_has_the_quickstarts():
    """The observer and the Flax QAT quickstarts are there (so this file tests something)."""
    sources = "\n".join(src for _, src in BLOCKS)
    assert len(BLOCKS) >= 2, [i for i, _ in BLOCKS]
    assert "jq.MinMaxObserver" in sources
    assert "prepare_qat" in sources and "convert" in sources


@pytest.mark.parametrize("source", [s for _, s in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_block_runs(source, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(source, encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"README block failed:\n{source}\n--- stderr ---\n{r.stderr[-3000:]}"
