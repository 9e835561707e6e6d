"""@opmap keeps the item and result types: mypy (strict) checks a small module using it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECKED = """
from __future__ import annotations

import asyncio
from typing_extensions import reveal_type

from opero import opmap


@opmap(mode="process", workers=2, retries=1)
def square(x: int, scale: float = 1.0) -> float:
    return x * x * scale


@opmap(mode="async", workers=10)
async def fetch(url: str) -> bytes:
    return url.encode()


reveal_type(square([1, 2]))  # T: list[float]
reveal_type(square.stream(range(3)))  # T: typing.Iterator[float]
reveal_type(asyncio.run(fetch(["a"])))  # T: list[bytes]
reveal_type(fetch.stream(["a"]))  # T: typing.AsyncIterator[bytes]
square(["not an int"])  # E: list-item
asyncio.run(fetch([b"bytes"]))  # E: list-item
"""


@pytest.mark.timeout(120)
def test_item_and_result_types_survive(tmp_path: Path, mypy: Any) -> None:
    source = tmp_path / "check_opmap.py"
    source.write_text(CHECKED)
    stdout = mypy(str(source), ROOT)
    lines = CHECKED.splitlines()
    seen_notes: dict[int, str] = {}
    seen_errors: dict[int, str] = {}
    for line in stdout.splitlines():
        m = re.match(r"^[^:]+:(\d+): (note|error): (.*?)(?:  \[([\w-]+)\])?$", line)
        assert m, line
        number, kind, text, code = int(m[1]), m[2], m[3], m[4]
        if kind == "note":
            seen_notes[number] = text.removeprefix("Revealed type is ").strip('"')
        else:
            seen_errors[number] = code or text
    want_notes = {n + 1: t.split("# T: ")[1] for n, t in enumerate(lines) if "# T: " in t}
    want_errors = {n + 1: t.split("# E: ")[1] for n, t in enumerate(lines) if "# E: " in t}
    assert seen_notes == want_notes
    assert seen_errors == want_errors
