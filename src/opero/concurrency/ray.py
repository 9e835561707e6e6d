"""``mode="ray"``: the plain calls as Ray tasks, at most ``workers`` at a time.

Which cluster: a Ray connection already open in this process is used as it is; else the address
given as ``cluster=`` or in ``RAY_ADDRESS`` is connected to; else a local Ray instance is started
with ``num_cpus=workers`` (no dashboard, worker output not forwarded). opero disconnects only what
it connected or started, when the last ``mode="ray"`` function using it closes (or at exit):
a local instance it started stops then, a cluster it connected to keeps running.

Ray itself would re-run a task whose worker died; here ``max_retries=0``, so the caller's
``retries``/``retry_on`` decide, as for local processes: a dead worker is a
:class:`~opero.errors.WorkerCrashedError`.

Before the first call opero runs one no-op task per worker slot and waits for them, for at most
``ready_timeout`` seconds: Ray then has its worker processes up and opero loaded in them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import ray
import ray.cloudpickle
import ray.exceptions

from opero._log import logger
from opero.concurrency._remote import ClusterBackend, _Call, decode, not_ready, run, warm
from opero.errors import RemoteError, WorkerCrashedError

# Errors that mean the task's worker, node or result is gone rather than that the call failed.
_LOST = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.RayActorError,
)


def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Runs on a Ray worker (see :func:`opero.concurrency._remote.run`)."""
    return run(fn, args, kwargs, ray.cloudpickle.dumps)


_task: Any = ray.remote(num_cpus=1, max_retries=0)(_invoke)


class _Session:
    """The process's Ray connection as far as opero opened it, shared by every RayBackend.

    ``ray.init`` runs on one long-lived thread: Ray ties the processes it starts to the life of
    the thread that started them, and a dispatcher thread ends when its function is closed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._keeper: ThreadPoolExecutor | None = None

    def acquire(self, workers: int, cluster: str | None) -> bool:
        """Make sure Ray is connected; True when opero opened the connection (call release)."""
        with self._lock:
            if self._users:
                self._users += 1
                return True
            if ray.is_initialized():
                if cluster is not None:
                    logger.warning(
                        "mode='ray': Ray is already connected in this process; "
                        "cluster=%r is not used",
                        cluster,
                    )
                return False
            address = cluster or os.environ.get("RAY_ADDRESS") or None
            if self._keeper is None:
                self._keeper = ThreadPoolExecutor(1, thread_name_prefix="opero-ray")
            self._keeper.submit(_init, workers, address).result()
            self._users = 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or self._keeper is None:
                return
            try:
                self._keeper.submit(ray.shutdown).result()
            except RuntimeError:  # at interpreter exit the keeper thread is already gone
                ray.shutdown()


def _init(workers: int, address: str | None) -> None:
    # ray.init runs on opero's keeper thread, where Ray cannot install its SIGTERM handler and
    # warns that it did not; the warning is expected here and says nothing to the user.
    ray_logger = logging.getLogger("ray._private.worker")
    ray_logger.addFilter(_not_main_thread)
    try:
        if address is None:
            logger.info("mode='ray': starting a local Ray instance with %d CPUs", workers)
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            logger.info("mode='ray': connecting to the Ray cluster at %s", address)
            ray.init(address=address)
    finally:
        ray_logger.removeFilter(_not_main_thread)


def _not_main_thread(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


_session = _Session()


class RayBackend(ClusterBackend):
    """Ray tasks; the module docstring tells which cluster and what a dead worker gives."""

    engine = "ray"

    def __init__(self, workers: int, *, cluster: object = None) -> None:
        super().__init__(workers, cluster=cluster)
        self._owned = False

    def _connect(self) -> None:
        address = self.cluster if isinstance(self.cluster, str) else None
        self._owned = _session.acquire(self.workers, address)
        # One no-op task per slot: Ray starts its worker processes and loads opero in them now,
        # not while the first items are waiting.
        refs = [_task.remote(warm, (), {}) for _ in range(self.workers)]
        try:
            ray.get(refs, timeout=self.ready_timeout)
        except BaseException as exc:
            for ref in refs:
                with contextlib.suppress(Exception):  # finished already
                    ray.cancel(ref, force=True)
            self._disconnect()
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                raise not_ready(
                    self.engine, self.ready_timeout, f"{self.workers} warm-up task(s)"
                ) from exc
            raise

    def _launch(self, call: _Call) -> None:
        ref = _task.remote(call.fn, call.args, call.kwargs)
        call.handle = ref

        def done(future: Future[Any]) -> None:
            self._finished(call, *_outcome(future))

        ref.future().add_done_callback(done)

    def _abort(self, calls: list[_Call]) -> None:
        for call in calls:
            if call.handle is not None:
                try:
                    ray.cancel(call.handle, force=True)
                except Exception as exc:  # already finished, or the cluster is gone
                    logger.debug("mode='ray': could not cancel a task: %r", exc)

    def _disconnect(self) -> None:
        if self._owned:
            self._owned = False
            _session.release()


def _outcome(future: Future[Any]) -> tuple[bool, Any]:
    """A finished ObjectRef future as ``(ok, value)``, with Ray's errors translated."""
    try:
        data = future.result()
    except ray.exceptions.TaskCancelledError as exc:
        return False, _with_cause(CancelledError(), exc)
    except ray.exceptions.RayTaskError as exc:
        # invoke never raises, so this is the engine failing around it (the function could not
        # be unpickled on the worker, say): hand back the original exception.
        cause = exc.cause
        if isinstance(cause, BaseException):
            return False, cause
        return False, RemoteError(type(exc).__qualname__, str(exc))
    except _LOST as exc:
        return False, _with_cause(
            WorkerCrashedError(f"the Ray worker running this item died: {exc}"), exc
        )
    except Exception as exc:  # another RayError: the cluster itself failed
        return False, exc
    return decode(data)


def _with_cause(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error
