"""A decorated function keeps its parameter and return types: mypy checks check_opero.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
CHECKED = HERE / "check_opero.py"
ROOT = HERE.parent.parent
MESSAGE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<kind>note|error): (?P<text>.*)$")


def expectations(kind: str) -> dict[int, str]:
    marker = f"# {kind}: "
    found: dict[int, str] = {}
    for number, line in enumerate(CHECKED.read_text().splitlines(), start=1):
        if line.strip().startswith(marker):  # on its own line: about the next line
            found[number + 1] = line.split(marker, 1)[1].strip()
        elif f"  {marker}" in line:
            found[number] = line.split(marker, 1)[1].strip()
    return found


@pytest.fixture(scope="module")
def mypy_output(mypy: Any) -> list[re.Match[str]]:
    stdout = mypy(str(CHECKED.relative_to(ROOT)), ROOT)
    matches = [MESSAGE.match(line) for line in stdout.splitlines()]
    assert all(matches), stdout
    return [m for m in matches if m is not None]


def test_revealed_types(mypy_output):
    revealed = {
        # older mypy versions spell builtins out ("builtins.str")
        int(m["line"]): m["text"]
        .removeprefix("Revealed type is ")
        .strip('"')
        .replace("builtins.", "")
        for m in mypy_output
        if m["kind"] == "note" and m["text"].startswith("Revealed type is")
    }
    expected = expectations("T")
    assert len(expected) >= 10
    assert revealed == expected


def test_bad_calls_are_type_errors_and_nothing_else_is(mypy_output):
    errors: dict[int, list[str]] = {}
    for m in mypy_output:
        if m["kind"] == "error":
            code = re.search(r"\[([\w-]+)\]$", m["text"])
            errors.setdefault(int(m["line"]), []).append(code[1] if code else m["text"])
    expected = expectations("E")
    assert len(expected) >= 4
    assert errors == {line: [code] for line, code in expected.items()}
