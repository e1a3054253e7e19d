"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    "block",
    [0, 1, 2, 3, 4],
    ids=["generic example", "decorator example", "sync example", "starlette", "flask"],
)
def test_the_examples_run(tmp_path: Path, block: int) -> None:
    """The README's first five Python blocks (the generic cache, values that age with the
    decorator, the sync API with the decorator on a sync function, a Starlette app and a
    Flask app) run to completion, their asserts included."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) > block, "the README lost an example"
    script = tmp_path / "example.py"
    script.write_text(blocks[block])
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if block == 0:
        assert (tmp_path / "cache.db").exists()
