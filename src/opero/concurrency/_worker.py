"""Code that runs inside worker processes. Kept small: it is imported by every worker.

Wire format on the pipe (one message per ``send_bytes``):

- parent -> worker ``b"F" + key(8) + cloudpickle(fn)``: remember function ``key``.
- parent -> worker ``b"C" + task(8) + key(8) + cloudpickle((args, kwargs))``: run a call.
- parent -> worker ``b""``: exit when idle.
- worker -> parent ``task(8) + status(1) + cloudpickle(value)``; status ``b"1"`` is a return value,
  ``b"0"`` an exception that survived a pickle round trip (else a RemoteError in its place), and
  ``b"P"`` a piece of a chunk's outcomes sent ahead of its return value (:func:`call_chunk`).
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
from collections.abc import Callable
from typing import Any

import cloudpickle

from opero.concurrency._portable import portable_exception
from opero.errors import RemoteError

ID = struct.Struct("!Q")


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
    return ID.pack(task) + b"0" + dumps(portable_exception(value, cloudpickle.dumps))


def dumps(value: object) -> bytes:
    """Plain pickle when it can (much faster for plain data: cloudpickle's by-value hook runs
    per object), cloudpickle for lambdas, closures and the like."""
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        data: bytes = cloudpickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        return data


Piece = tuple[list[Any], dict[int, BaseException]]

# Seconds of work after which a chunk sends the outcomes it has so far: if its worker dies, only
# the item it was running fails, and at most this much finished work is lost and run again.
FLUSH_EVERY = 0.01


class _Hooks:
    """What a process-mode worker lends :func:`call_chunk` for the call it is running (both
    ``None`` elsewhere, for example on Ray or Dask workers)."""

    # a shared one-slot array: the offset in the chunk of the item running now, -1 between calls
    progress: Any = None
    # sends a piece of the chunk's outcomes to the parent now; False when they cannot be pickled
    report: Callable[[Piece], bool] | None = None


def call_chunk(fn: Callable[..., Any], items: list[Any], kwargs: dict[str, Any]) -> Piece:
    """Run ``fn(item, **kwargs)`` for a chunk of items: the values (``None`` where an item
    failed) and ``{offset: exception}``, which pickle faster than one tuple per item. In a
    process-mode worker the first items' outcomes may go ahead in pieces (:func:`join_pieces`);
    the return value is then the rest."""
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    append = values.append
    progress, report = _Hooks.progress, _Hooks.report
    base = 0  # offset in the chunk of values[0]
    # The clock is read after every item while items are slow, and up to every 256th item
    # (about a millisecond) while they are fast: reading it per item would add a third to a
    # trivial item's cost.
    check, stride = 0, 1
    last = looked = time.perf_counter()
    for offset, item in enumerate(items):
        if progress is not None:
            progress[0] = offset
        try:
            append(fn(item, **kwargs))
        # sys.exit() in an item is its outcome, as in a thread; a KeyboardInterrupt (an engine
        # cancelling its task) ends the chunk
        except (Exception, SystemExit) as exc:
            append(None)
            errors[offset - base] = portable_exception(exc, cloudpickle.dumps)
        if report is not None and offset >= check:
            now = time.perf_counter()
            stride = min(2 * stride, 256) if now - looked < 0.001 else 1
            check, looked = offset + stride, now
            if now - last >= FLUSH_EVERY:
                if report((values, errors)):
                    base = offset + 1
                    values, errors = [], {}
                    append = values.append
                last = now
    return values, errors


def join_pieces(pieces: list[Piece]) -> Piece:
    """One chunk's outcomes from the pieces it sent, in order."""
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    for piece_values, piece_errors in pieces:
        base = len(values)
        values += piece_values
        for offset, exc in piece_errors.items():
            errors[base + offset] = exc
    return values, errors


def _send_piece(send: Callable[[bytes], None], task: int, piece: Piece) -> bool:
    try:
        data = dumps(piece)
    except Exception:  # the final outcome reports it, for the whole chunk
        return False
    send(ID.pack(task) + b"P" + data)
    return True


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


def main(conn: Any, concurrency: int, parent: int, progress: Any = None) -> None:
    """A worker's loop: read calls, run them, send outcomes. ``concurrency > 1`` runs that many
    calls at once on an event loop (``mode="async_process"``); ``progress`` (one call at a time
    only) is where :func:`call_chunk` records the item it runs."""
    # Ctrl-C goes to the whole process group; the parent decides what stops, not each worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    functions: dict[int, Callable[..., Any]] = {}
    send_lock = threading.Lock()

    def send(data: bytes) -> None:
        with send_lock:
            conn.send_bytes(data)

    # A memoryview writes the shared slot faster than the ctypes array it views.
    slot = None if progress is None else memoryview(progress).cast("B").cast("q")
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
        if progress is not None:
            _Hooks.progress = slot
            _Hooks.report = functools.partial(_send_piece, send, task)
        try:
            args, kwargs = pickle.loads(data[17:])
            result = functions[key](*args, **kwargs)
        # SystemExit or KeyboardInterrupt raised by the user's code is that call's outcome, as
        # in a thread: it is not retried, and the worker stays (it ignores real Ctrl-C anyway)
        except BaseException as exc:
            send(encode_outcome(task, False, exc))
            continue
        finally:
            if slot is not None:
                slot[0] = -1  # before the outcome goes: a death after it blames no item
                _Hooks.report = None
        if not inspect.iscoroutine(result):
            send(encode_outcome(task, True, result))
        elif loop is None:
            try:
                value = asyncio.run(result)
            except BaseException as exc:
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
