"""Code that runs inside worker processes. Kept small: it is imported by every worker.

Wire format on the pipe (one message per ``send_bytes``):

- parent -> worker ``b"F" + key(8) + cloudpickle(fn)``: remember function ``key``.
- parent -> worker ``b"C" + task(8) + key(8) + cloudpickle((args, kwargs))``: run a call.
- parent -> worker ``b""``: exit when idle.
- worker -> parent ``task(8) + status(1) + cloudpickle(value)``; status ``b"1"`` is a return value,
  ``b"0"`` an exception that survived a pickle round trip (else a RemoteError in its place).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import pickle
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from opero.errors import RemoteError

ID = struct.Struct("!Q")


def portable_exception(
    exc: BaseException, dumps: Callable[[object], bytes] = cloudpickle.dumps
) -> BaseException:
    """``exc`` itself when it survives pickling (with ``dumps``), else a RemoteError naming its
    type and message."""
    try:
        pickle.loads(dumps(exc))
    except Exception:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:
            message = str(exc)
        except Exception:
            message = "<str() failed>"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RemoteError(name, message, tb)
    return exc


def encode_outcome(task: int, ok: bool, value: object) -> bytes:
    if ok:
        try:
            return ID.pack(task) + b"1" + dumps(value)
        except Exception as exc:
            value = RemoteError(
                type(exc).__qualname__, f"the result could not be pickled: {exc}", ""
            )
        return ID.pack(task) + b"0" + dumps(value)
    assert isinstance(value, BaseException)
    return ID.pack(task) + b"0" + dumps(portable_exception(value))


def dumps(value: object) -> bytes:
    """Plain pickle when it can (much faster for plain data: cloudpickle's by-value hook runs
    per object), cloudpickle for lambdas, closures and the like."""
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        data: bytes = cloudpickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        return data


def call_chunk(
    fn: Callable[..., Any], items: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[int, BaseException]]:
    """Run ``fn(item, **kwargs)`` for a chunk of items: the values (``None`` where an item
    failed) and ``{offset: exception}``, which pickle faster than one tuple per item."""
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    append = values.append
    for offset, item in enumerate(items):
        try:
            append(fn(item, **kwargs))
        except Exception as exc:  # noqa: PERF203 - one try per item is the point
            append(None)
            errors[offset] = portable_exception(exc)
    return values, errors


def _watch_parent(parent: int) -> None:
    # The pipe's EOF ends an idle worker; this ends a busy one whose parent was killed. (Under
    # forkserver the worker's parent process is the server, so the caller's pid is watched.)
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        except OSError:  # pragma: no cover - exists but is not ours to signal
            pass


def main(conn: Any, concurrency: int, parent: int) -> None:
    """A worker's loop: read calls, run them, send outcomes. ``concurrency > 1`` runs that many
    calls at once on an event loop (``mode="async_process"``)."""
    # Ctrl-C goes to the whole process group; the parent decides what stops, not each worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    functions: dict[int, Callable[..., Any]] = {}
    send_lock = threading.Lock()

    def send(data: bytes) -> None:
        with send_lock:
            conn.send_bytes(data)

    loop: asyncio.AbstractEventLoop | None = None
    if concurrency > 1:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break
        if not data:
            break
        tag = data[:1]
        if tag == b"F":
            (key,) = ID.unpack_from(data, 1)
            try:
                functions[key] = pickle.loads(data[9:])
            except Exception as exc:  # e.g. its module cannot be imported here
                functions[key] = functools.partial(_reraise, exc)
            continue
        task, key = struct.unpack_from("!QQ", data, 1)
        try:
            args, kwargs = pickle.loads(data[17:])
            result = functions[key](*args, **kwargs)
        except Exception as exc:
            send(encode_outcome(task, False, exc))
            continue
        if not inspect.iscoroutine(result):
            send(encode_outcome(task, True, result))
        elif loop is None:
            try:
                value = asyncio.run(result)
            except Exception as exc:
                send(encode_outcome(task, False, exc))
            else:
                send(encode_outcome(task, True, value))
        else:
            future = asyncio.run_coroutine_threadsafe(result, loop)
            future.add_done_callback(functools.partial(_reply, send, task))


def _reraise(exc: BaseException, *args: object, **kwargs: object) -> None:
    raise exc


def _reply(send: Callable[[bytes], None], task: int, future: Any) -> None:
    try:
        value = future.result()
    except BaseException as exc:
        send(encode_outcome(task, False, exc))
    else:
        send(encode_outcome(task, True, value))
