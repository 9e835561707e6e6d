"""Checked by mypy only (tests/typing/test_reveal_types.py), never imported.

Each ``reveal_type`` line ends with a ``# T:`` comment holding the type mypy must reveal (or has it
on a comment line of its own just above); each line ending in ``# E:`` must be a type error with that
error code, and no other line may have one.
"""

# ruff: noqa: E501 - expected types are written out in full

from __future__ import annotations

from typing_extensions import reveal_type

from opero import opero


@opero(retries=2, retry_on=ConnectionError)
def fetch(url: str, timeout: float = 1.0) -> bytes:
    return url.encode()


@opero(cache=True, arg_fallback="keys")
async def afetch(url: str, keys: list[str], *, limit: int = 3) -> dict[str, int]:
    return {url: limit}


class Client:
    @opero(retries=1)
    def get(self, path: str) -> int:
        return len(path)

    @opero(cache=True)
    async def aget(self, path: str) -> list[int]:
        return [len(path)]

    @staticmethod
    @opero(retries=1)
    def parse(text: str) -> float:
        return float(text)

    @opero(cache=True)
    @classmethod
    def make(cls, n: int) -> int:
        return n

    @opero(cache=True)
    @staticmethod
    def smake(n: int) -> str:
        return str(n)

    @classmethod
    @opero(retries=1)
    def create(cls, name: str) -> Client:
        return cls()


async def use() -> None:
    reveal_type(fetch)  # T: def (url: str, timeout: float =) -> bytes
    reveal_type(fetch("x"))  # T: bytes
    # T: def (url: str, keys: list[str], *, limit: int =) -> typing.Coroutine[Any, Any, dict[str, int]]
    reveal_type(afetch)
    reveal_type(await afetch("u", ["k"]))  # T: dict[str, int]
    reveal_type(Client().get)  # T: def (path: str) -> int
    reveal_type(await Client().aget("p"))  # T: list[int]
    reveal_type(Client.parse("1.5"))  # T: float
    reveal_type(Client.create("n"))  # T: check_opero.Client
    reveal_type(Client.make(1))  # T: int
    reveal_type(Client().smake(1))  # T: str
    fetch(1)  # E: arg-type
    fetch("x", timeout="slow")  # E: arg-type
    await afetch("u", ["k"], limits=3)  # E: call-arg
    Client().get()  # E: call-arg
