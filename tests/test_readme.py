"""The README is the contract: every Python example in it runs as written, in a new interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _block_id(index: int) -> str:
    heading = ""
    text = README.read_text(encoding="utf-8")
    position = text.find(BLOCKS[index])
    for match in re.finditer(r"^#+ (.+)$", text[:position], flags=re.M):
        heading = match.group(1)
    return f"{index}-{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}"


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=_block_id)
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    env = {**os.environ, "OPERO_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"example failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), "every example prints what it did"
